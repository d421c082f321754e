"""Cohort queries on the shared benchmark corpus, timed through the annotation API of `gateway serve`.

The corpus is made by the generator of the shared benchmark folder (`../shared/bench/` beside the project;
its README describes the corpus, the query classes 1a–7 and the existing service's figures). Make it
outside the repository (1,000,000 documents: about 5 GB and 5 minutes), then run this from the project:

    (cd ../shared/bench && python3 gen_fast.py ~/corpus_1m 1000000)
    .venv/bin/python bench/cohort.py --corpus ~/corpus_1m --store postgresql --keep ~/cohort_pg
    .venv/bin/python bench/cohort.py --keep ~/cohort_pg --reuse --only 5,6c     # again, without reloading
    .venv/bin/python bench/cohort.py --corpus ~/corpus_20k --store sqlite       # a quick look, thrown away

Loading: a new database (a throwaway one unless --keep: an SQLite file in the folder, or a database of
its own on the PostgreSQL server at 127.0.0.1:5432) gets the schema, the dictionary from the corpus'
umls_csv/ (the SemEHR CSV loader) and the documents of docs.jsonl through import_documents inside
`loading`, as `gateway annotations import` writes them (reader processes parse the lines meanwhile);
then ANALYZE. The load rate counts the index build at the end of a bulk load.

Queries: `gateway serve` with its defaults (as a site runs it) serves the store on a loopback port; each
case is sent as GET /api/search_anns/CASE?j=QUERY by one sequential client, 2 warm-ups then 20 timed
requests (the whole answer received), as the existing service was measured. The cases come from the
corpus' queries.json and its own document counts, as the shared README builds them; "6c" is two queries
there (two CUIs of ~1,000 documents each, two of ~3,000), so here 6c-1000 and 6c-3000.

Correct counts are worked out from docs.jsonl while it loads, without the gateway, by PRODUCT.md's rules:
an annotation that the NLP ruled out never matches, qualifiers constrain the annotation that matched,
expansion follows rel.csv within the queried concept's semantic group, free text matches a word of an
annotation's preferred name. The shared README's own counts include ruled-out annotations, so its
"existing, 1M" column is slightly higher than a correct answer.

--keep DIR keeps the store (and what the run needs to time it again) in DIR; --reuse times it again.
A kept PostgreSQL database is named in DIR/cohort.json: `DROP DATABASE name` removes it.
"""
import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy
import requests
import sqlalchemy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout that is not pip-installed

from gateway import create_app  # noqa: E402
from gateway.annotations.dictionary import load_semehr_csv  # noqa: E402
from gateway.annotations.store import (  # noqa: E402
    METADATA_COLUMNS, RULED_OUT_BY, Document, dicom_date, import_documents, loading,
)
from gateway.db import db, init_db  # noqa: E402
from stores import analyse, create_database, drop_database  # noqa: E402  (bench/stores.py, beside this file)

QUALIFIERS = {"negation": "Affirmed", "experiencer": "Patient", "temporality": ["Recent"]}  # the README's QUAL
FILTER = {"start_date": "2010-01-01", "end_date": "2015-12-31", "modalities": ["CT", "MR"]}  # its FILT
FILTER_START, FILTER_END = (datetime.date.fromisoformat(FILTER[bound]) for bound in ("start_date", "end_date"))
FILTER_MODALITIES = frozenset(FILTER["modalities"])
FREE_TEXT = "nodule"
# The existing service's figures at 1,000,000 documents, as the shared README gives them: documents found
# and p50 in seconds.
EXISTING = {
    "1a": (603_210, "7.03"), "1b": (12, "0.121"), "2a": (11_263, "0.473"), "2b": (178_030, "3.14"),
    "3a": (7_356, "0.49"), "3b": (118_976, "3.44"), "4a": (577, "0.46"), "4b": (9_169, "4.47"),
    "5": (721_718, "57.8"), "6a": (227_693, "> 60"), "6b": (24_176, "> 60"), "6c-1000": (2, "0.186"),
    "6c-3000": (8, "0.586"), "7": (896_163, "16.0"),
}  # fmt: skip
CASES = tuple(EXISTING)
WARM_UPS, TIMED = 2, 20
REQUEST_TIMEOUT = 600  # seconds; a case that takes longer is reported as failed
BATCH = 5000  # documents per transaction, as `gateway annotations import` writes them
READERS = min(2, os.cpu_count() or 1)  # parsing a line costs about twice what writing it does
KEPT = "cohort.json"

# What the answer key records of each annotation
RULED_OUT, QUALIFIED, NAMES_THE_WORD = 1, 2, 4


# --- the corpus and its answer key -------------------------------------------------------------------------


@dataclasses.dataclass
class KeyPart:
    """A batch's share of the answer key: per annotation its document (index in the batch), CUI number and
    flags; per document whether FILTER keeps it."""

    document: numpy.ndarray
    cui: numpy.ndarray
    flags: numpy.ndarray
    in_filter: numpy.ndarray


def _qualified(annotation):
    """Whether the annotation has the values of QUALIFIERS (of a list, one), ignoring case."""
    for name, wanted in QUALIFIERS.items():
        allowed = {value.lower() for value in (wanted if isinstance(wanted, list) else [wanted])}
        if str(annotation.get(name)).lower() not in allowed:
            return False
    return True


def _annotation_flags(annotation):
    flags = RULED_OUT if any(rule in RULED_OUT_BY for rule in annotation.get("ruled_by") or ()) else 0
    if _qualified(annotation):
        flags |= QUALIFIED
    # a plain word match: in this corpus' vocabulary no two words share an English stem
    if FREE_TEXT in re.findall(r"\w+", (annotation.get("pref") or "").lower()):
        flags |= NAMES_THE_WORD
    return flags


def _in_filter(document):
    modalities = set((document.modalities_in_study or "").split("\\"))
    return (
        document.content_date is not None and FILTER_START <= document.content_date <= FILTER_END
        and bool(modalities & FILTER_MODALITIES)
    )


def read_batch(lines):
    """In a reader process: the Documents of some docs.jsonl lines (each the NLP result with the DICOM
    metadata keys and redacted_text), and their KeyPart."""
    documents, owners, cuis, flags = [], [], [], []
    for number, line in enumerate(lines.splitlines()):
        record = json.loads(line)
        fields = {column.name: record[keyword] for keyword, column in METADATA_COLUMNS.items() if record.get(keyword)}
        if "content_date" in fields:
            fields["content_date"] = dicom_date(fields["content_date"])
        documents.append(Document(
            annotations=record["annotations"], phenotypes=record.get("phenotypes", []),
            sentences=record.get("sentences", []), report_text=record.get("redacted_text"), **fields,
        ))  # fmt: skip
        for annotation in record["annotations"]:
            owners.append(number)
            cuis.append(int(annotation["cui"][1:]))
            flags.append(_annotation_flags(annotation))
    part = KeyPart(
        numpy.array(owners, numpy.int32), numpy.array(cuis, numpy.int32), numpy.array(flags, numpy.uint8),
        numpy.array([_in_filter(document) for document in documents], bool),
    )
    return documents, part


class AnswerKey:
    """Which documents a case must find, from the whole corpus' KeyParts."""

    def __init__(self, parts):
        offsets = numpy.cumsum([0] + [len(part.in_filter) for part in parts])
        self.document = numpy.concatenate([part.document + offset for part, offset in zip(parts, offsets)])
        self.cui = numpy.concatenate([part.cui for part in parts])
        self.flags = numpy.concatenate([part.flags for part in parts])
        self.in_filter = numpy.concatenate([part.in_filter for part in parts])

    def documents_per_cui(self):
        """(CUI numbers, documents naming each), every annotation counted (as the corpus' counts are)."""
        pairs = numpy.unique(self.document.astype(numpy.int64) << 32 | self.cui)
        return numpy.unique(pairs & 0xFFFFFFFF, return_counts=True)

    def count(self, case, dictionary):
        found = numpy.ones(len(self.in_filter), bool) if not case.filtered else self.in_filter.copy()
        for q, depth in case.terms:
            matches = (self.flags & RULED_OUT) == 0
            if case.qualified:
                matches &= (self.flags & QUALIFIED) != 0
            if q == FREE_TEXT:
                matches &= (self.flags & NAMES_THE_WORD) != 0
            else:
                matches &= numpy.isin(self.cui, [int(cui[1:]) for cui in dictionary.expand(q, depth)])
            term_found = numpy.zeros(len(self.in_filter), bool)
            term_found[self.document[matches]] = True
            found &= term_found
        return int(found.sum())


class Dictionary:
    """The corpus' narrower relations and semantic groups, read from umls_csv/ for the answer key."""

    def __init__(self, folder):
        self.group, self.children = {}, collections.defaultdict(list)
        for line in (folder / "cui.csv").read_text().splitlines()[1:]:
            cui, _tuis, group, _name = line.split("|")
            self.group[cui] = group
        for line in (folder / "rel.csv").read_text().splitlines()[1:]:
            parent, relation, children = line.split("|")
            if relation == "RN":
                self.children[parent] += children.split(",")

    def expand(self, cui, depth):
        """The concept and its narrower ones to `depth` levels (None: all) within its semantic group."""
        found, frontier, level = {cui}, [cui], 0
        while frontier and (depth is None or level < depth):
            frontier = [
                child for parent in frontier for child in self.children[parent]
                if child not in found and self.group.get(child) == self.group[cui]
            ]  # fmt: skip
            found.update(frontier)
            level += 1
        return found


@dataclasses.dataclass
class Case:
    name: str
    terms: list  # (q, qdepth) ANDed; q a CUI or FREE_TEXT, qdepth None for full depth
    description: str
    qualified: bool = False
    filtered: bool = False
    correct: int = None

    def query(self):
        terms = [
            {"q": q, **({} if depth is None else {"qdepth": depth}), **(QUALIFIERS if self.qualified else {})}
            for q, depth in self.terms
        ]
        return {"terms": terms, **({"filter": FILTER} if self.filtered else {})}


def make_cases(corpus, key):
    """The query classes of the shared README, from queries.json and the corpus' counts, with their correct counts."""
    queries = json.loads((corpus / "queries.json").read_text())
    cuis, counts = key.documents_per_cui()

    def cui_text(index):
        return f"C{cuis[index]:07d}"  # UMLS CUIs have seven digits

    def nearest(wanted, how_many):
        """The CUIs whose document counts are nearest `wanted` (the commonest first for wanted=None)."""
        distance = -counts if wanted is None else numpy.abs(counts - wanted)
        return [int(index) for index in numpy.lexsort((cuis, distance))[:how_many]]

    def single(indexes, what):
        named = " AND ".join(f"{cui_text(index)} ({counts[index]:,} docs)" for index in indexes)
        return [(cui_text(index), 0) for index in indexes], f"{what}: {named}, qdepth 0"

    small, large = queries["subtree_111"][0], queries["subtree_1111"][:2]
    cases = [
        Case("1a", *single(nearest(None, 1), "most frequent CUI")),
        Case("1b", *single(nearest(10, 1), "CUI in ~10 docs")),
        Case("2a", [(small, None)], f"subtree_111[0] {small}"),
        Case("2b", [(large[0], None)], f"subtree_1111[0] {large[0]}"),
        Case("3a", [(small, None)], "2a + QUAL", qualified=True),
        Case("3b", [(large[0], None)], "2b + QUAL", qualified=True),
        Case("4a", [(small, None)], "3a + FILT", qualified=True, filtered=True),
        Case("4b", [(large[0], None)], "3b + FILT", qualified=True, filtered=True),
        Case("5", [(FREE_TEXT, None)], f"free text '{FREE_TEXT}'"),
        Case("6a", *single(nearest(None, 2), "2 most frequent")),
        Case("6b", [(cui, None) for cui in large], f"subtree_1111[0] AND [1]: {' AND '.join(large)}"),
        Case("6c-1000", *single(nearest(1000, 2), "~1,000 docs each")),
        Case("6c-3000", *single(nearest(3000, 2), "~3,000 docs each")),
        Case("7", [(queries["root_11111"][0], None)], f"root_11111[0] {queries['root_11111'][0]}"),
    ]
    dictionary = Dictionary(corpus / "umls_csv")
    for case in cases:
        case.correct = key.count(case, dictionary)
    return cases


# --- building the store ------------------------------------------------------------------------------------


def _line_batches(path):
    with path.open("rb") as lines:
        while batch := b"".join(line for _, line in zip(range(BATCH), lines)):
            yield batch


def _line_count(path):
    with path.open("rb") as source:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: source.read(1 << 24), b""))


def load_documents(path):
    """(figures, AnswerKey) of importing docs.jsonl into the app's store, as `gateway annotations import`
    writes its batches."""
    document_count = _line_count(path)
    parts, known_prefs, done, writing = [], set(), 0, 0.0
    started = time.perf_counter()
    with loading(document_count) as bulk, ProcessPoolExecutor(max_workers=READERS) as readers:
        print(f"  {document_count:,} documents; a bulk load (indexes built at the end): {bulk}", flush=True)
        pending = collections.deque()

        def write_next():
            nonlocal done, writing
            documents, part = pending.popleft().result()
            write_started = time.perf_counter()
            import_documents(documents, known_prefs)
            writing += time.perf_counter() - write_started
            parts.append(part)
            done += len(documents)
            if done % 100_000 < BATCH or done == document_count:
                rate = done / (time.perf_counter() - started)
                print(f"  {done:>9,} documents, {rate:,.0f} docs/s so far", flush=True)

        for lines in _line_batches(path):
            pending.append(readers.submit(read_batch, lines))
            if len(pending) > READERS + 1:  # bounds what waits in memory
                write_next()
        while pending:
            write_next()
        index_started = time.perf_counter()
    finished = time.perf_counter()
    figures = {
        "documents": document_count, "load_seconds": finished - started, "index_seconds": finished - index_started,
        "import_documents_seconds": writing,
    }
    return figures, AnswerKey(parts)


def store_megabytes(database_url):
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                size = connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one()
            else:
                size = Path(engine.url.database).stat().st_size
    finally:
        engine.dispose()
    return size / 1e6


def build_store(corpus, database_url, folder):
    """The figures of filling the new database at `database_url` from the corpus, and its cases."""
    app = create_app({"DATABASE_URL": database_url, "STORAGE_DIR": str(folder / "storage")})
    with app.app_context():
        init_db()
        started = time.perf_counter()
        summary = load_semehr_csv(corpus / "umls_csv")
        dictionary_seconds = time.perf_counter() - started
        print(f"  dictionary: {summary} in {dictionary_seconds:,.0f} s", flush=True)
        figures, key = load_documents(corpus / "docs.jsonl")
        db.engine.dispose()
    started = time.perf_counter()
    analyse(database_url)
    figures.update(dictionary_seconds=dictionary_seconds, analyse_seconds=time.perf_counter() - started,
                   store_mb=store_megabytes(database_url))
    print("  working out the correct counts", flush=True)
    return figures, make_cases(corpus, key)


# --- timing through HTTP -----------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(database_url, storage_dir, log_path):
    """`gateway serve` with its own defaults on a free loopback port, over the store; yields its base URL."""
    executable = shutil.which("gateway", path=os.path.dirname(sys.executable))
    if executable is None:
        raise SystemExit("no `gateway` command beside this Python: run the bench with the project's .venv/bin/python")
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}  # no passphrase
    env.update(GATEWAY_DATABASE_URL=database_url, GATEWAY_STORAGE_DIR=str(storage_dir))
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        server = subprocess.Popen([executable, "serve", "--bind", f"127.0.0.1:{port}"], env=env, cwd=storage_dir.parent,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise SystemExit(f"gateway serve exited {server.returncode}; its log: {log_path}")
            with contextlib.suppress(requests.ConnectionError, requests.Timeout):
                if requests.get(f"{base_url}/api/need_passphrase", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"gateway serve did not answer in 60 s; its log: {log_path}")
            time.sleep(0.2)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=40)  # gunicorn's graceful shutdown
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def time_case(session, base_url, case):
    """(documents found, sorted timed seconds), or (an error message, None)."""
    url = f"{base_url}/api/search_anns/{case.name}"  # with j= the path's QUERY is not used
    params = {"j": json.dumps(case.query())}
    found, times = set(), []
    for run in range(WARM_UPS + TIMED):
        started = time.perf_counter()
        try:
            response = session.get(url, params=params, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as error:
            return f"no answer: {type(error).__name__}", None
        elapsed = time.perf_counter() - started
        try:
            answer = response.json()
        except ValueError:
            return f"HTTP {response.status_code}, not JSON (cut short?)", None
        if response.status_code != 200 or not answer.get("success"):
            return f"HTTP {response.status_code}: {answer.get('message', '')}", None
        if answer["num_results"] != len(answer["results"]):
            return f"num_results {answer['num_results']:,} but {len(answer['results']):,} results", None
        found.add(answer["num_results"])
        if run >= WARM_UPS:
            times.append(elapsed)
    if len(found) > 1:
        return f"found {', '.join(map(str, sorted(found)))} in different runs", None
    return found.pop(), sorted(times)


def time_cases(kept, folder, only):
    cases = [Case(**case) for case in kept["cases"] if case["name"] in only]
    storage_dir = folder / "storage"
    storage_dir.mkdir(exist_ok=True)
    print(f"\ntiming {len(cases)} cases through gateway serve ({WARM_UPS} warm-ups, {TIMED} timed each); "
          f"load average {_load_average()}", flush=True)
    rows = []
    with (
        serving(kept["database_url"], storage_dir, folder / "gateway-serve.log") as base_url,
        requests.Session() as session,
    ):
        for case in cases:
            found, times = time_case(session, base_url, case)
            rows.append((case, found, times))
            outcome = found if times is None else f"{found:,} found, p50 {statistics.median(times):.3f} s"
            print(f"  {case.name}: {outcome}", flush=True)
    print_table(kept, rows)


def _p95(sorted_times):
    return sorted_times[math.ceil(0.95 * len(sorted_times)) - 1]


def _load_average():
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def print_table(kept, rows):
    figures = kept["figures"]
    print(f"\n{kept['store']}, {figures['documents']:,} documents, {os.cpu_count()} CPUs, "
          f"load average {_load_average()} (1, 5, 15 min)")
    rate = figures["documents"] / figures["load_seconds"]
    print(f"  loaded in {figures['load_seconds']:,.0f} s ({rate:,.0f} docs/s; of it import_documents "
          f"{figures['import_documents_seconds']:,.0f} s, the index build {figures['index_seconds']:,.0f} s); "
          f"dictionary {figures['dictionary_seconds']:,.0f} s; ANALYZE {figures['analyse_seconds']:,.0f} s; "
          f"store {figures['store_mb']:,.0f} MB")
    header = ("case", "query", "found", "correct", "p50 s", "p95 s", "existing 1M: found", "p50 s")
    lines, failures = [], []
    for case, found, times in rows:
        existing_found, existing_p50 = EXISTING[case.name]
        if times is None:
            ours = ("failed", f"{case.correct:,}", "", "")
            failures.append(f"  {case.name} failed: {found}")
        else:
            ours = (f"{found:,}" + ("" if found == case.correct else " WRONG"), f"{case.correct:,}",
                    f"{statistics.median(times):.3f}", f"{_p95(times):.3f}")
        lines.append((case.name, case.description, *ours, f"{existing_found:,}", existing_p50))
    widths = [max(len(line[column]) for line in [header, *lines]) for column in range(len(header))]
    for line in [header, *lines]:
        print("  " + "  ".join(text.ljust(width) if column < 2 else text.rjust(width)
                               for column, (text, width) in enumerate(zip(line, widths))))
    for failure in failures:
        print(failure)


# --- the command ---------------------------------------------------------------------------------------------


def selected_cases(text):
    """The cases that --only names: each one by its name or a prefix of it (6c: 6c-1000 and 6c-3000)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if not any(case.startswith(name) for case in CASES)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown cases {', '.join(unknown)}; the cases are {', '.join(CASES)}")
    return tuple(case for case in CASES if any(case.startswith(name) for name in names))


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, help="the folder that gen_fast.py made (not needed with --reuse)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), help="(with --reuse: the kept one)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build the store in DIR (new or empty) and keep it, to time it again")
    parser.add_argument("--reuse", action="store_true", help="time the store kept in --keep DIR again, without loading")
    parser.add_argument("--only", type=selected_cases, default=CASES, metavar="CASES",
                        help=f"comma-separated cases or prefixes of them, from {', '.join(CASES)}")
    arguments = parser.parse_args()
    if arguments.reuse and arguments.keep is None:
        parser.error("--reuse times the store of --keep DIR")
    if not arguments.reuse:
        if arguments.corpus is None or arguments.store is None:
            parser.error("--corpus and --store are needed to build a store")
        if not (arguments.corpus / "docs.jsonl").is_file():
            parser.error(f"{arguments.corpus} holds no docs.jsonl: not a corpus that gen_fast.py made")
        if arguments.keep is not None and arguments.keep.exists() and any(arguments.keep.iterdir()):
            parser.error(f"{arguments.keep} is not empty: --reuse times its store again, or name a new folder")
    return arguments


def main():
    arguments = parse_arguments()
    if arguments.reuse:
        folder = arguments.keep.resolve()
        if not (folder / KEPT).is_file():
            raise SystemExit(f"{folder} holds no finished store ({KEPT})")
        kept = json.loads((folder / KEPT).read_text())
        if arguments.store not in (None, kept["store"]):
            raise SystemExit(f"{folder} holds a {kept['store']} store")
        print(f"{kept['store']}: the store of {kept['corpus']} kept in {folder}")
        time_cases(kept, folder, arguments.only)
        return
    with contextlib.ExitStack() as cleanup:
        if arguments.keep is None:
            folder = Path(tempfile.mkdtemp(prefix="gateway-cohort-"))
            cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
        else:
            folder = arguments.keep.resolve()
            folder.mkdir(parents=True, exist_ok=True)
        database_url = create_database(arguments.store, folder)
        cleanup.callback(drop_database, database_url)
        print(f"{arguments.store}: loading {arguments.corpus}", flush=True)
        figures, cases = build_store(arguments.corpus.resolve(), database_url, folder)
        kept = {"store": arguments.store, "database_url": database_url, "corpus": str(arguments.corpus.resolve()),
                "figures": figures, "cases": [dataclasses.asdict(case) for case in cases]}
        if arguments.keep is not None:
            (folder / KEPT).write_text(json.dumps(kept, indent=1))
            cleanup.pop_all()  # built: kept from here on, whatever happens while timing
            print(f"  kept in {folder}" + (f" (database {sqlalchemy.make_url(database_url).database})"
                                           if arguments.store == "postgresql" else ""))
        time_cases(kept, folder, arguments.only)


if __name__ == "__main__":
    main()
