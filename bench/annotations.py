"""Import rate and query latency of the annotation store on a generated corpus.

    .venv/bin/python bench/annotations.py --store sqlite
    .venv/bin/python bench/annotations.py --store postgresql
    .venv/bin/python bench/annotations.py --store sqlite --docs 100000    # a quicker, smaller run

The corpus: a dictionary of --concepts concepts in a hierarchy (mostly a 4-way tree of one semantic
group per branch, some concepts with a second parent, one cycle), --docs documents of 20 annotations
each, CUIs drawn Zipf-like (s=1.2), the commoner the shallower in the tree, mixed qualifiers, 2% ruled out,
ContentDates over 20 years, ModalitiesInStudy from common combinations, a report text of 40 words.

Measured: documents/s of gateway.annotations.store.import_documents in batches, inside `loading` as the CLI
does it (into the empty store a bulk load: the concept index is built at the end, and its time counts), while
another process generates the batches as the CLI's reader processes read files; and of `import_folder`
(the whole CLI path) on 100,000 JSON files into an empty store of its own (a bulk load), and on 20,000
into the store that then holds 1,000,000 (indexes kept up row by row); then, in a separate
process that does nothing else, p50/p95 of each query run 30 times, and that process's peak RSS.
Everything runs in a throwaway database (and folder) that is removed at the end.
"""
import argparse
import collections
import contextlib
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout that is not pip-installed

from gateway import create_app  # noqa: E402
from gateway.annotations.importer import import_folder  # noqa: E402
from gateway.annotations.query import parse_query, search_annotations, search_documents  # noqa: E402
from gateway.annotations.store import Document, import_documents, loading  # noqa: E402
from gateway.db import db, init_db, write_engine  # noqa: E402
from gateway.models import concept_relations, concept_types, concepts  # noqa: E402
from stores import analyse, throwaway_database  # noqa: E402  (bench/stores.py, beside this file)

GROUPS = ("ANAT", "DISO", "PROC", "CHEM", "PHYS", "CONC")
MODALITIES = ("CT", "MR", "CR", "DX", "US", "CT\\SR", "MR\\SR", "CR\\DX", "PT\\CT", "MG", "NM", "XA")
QUALIFIERS = {
    "negation": (("Affirmed", "Negated"), (0.8, 0.2)),
    "experiencer": (("Patient", "Other"), (0.95, 0.05)),
    "temporality": (("Recent", "historical", "hypothetical"), (0.85, 0.1, 0.05)),
}
TARGETS = {  # figure: (target, higher is better)
    "import docs/s": (3000, True),
    "single CUI p50 ms": (100, False),
    "single CUI p95 ms": (300, False),
    "qualifiers p50 ms": (150, False),
    "free text p50 ms": (200, False),
    "free text word p50 ms": (1000, False),
    "search_docs p50 ms": (200, False),
    "query process peak RSS MB": (500, False),
}
ANNOTATIONS_PER_DOC = 20
ZIPF_EXPONENT = 1.2
WORDS_PER_TEXT = 40
BATCH = 5000  # documents per transaction, as `gateway annotations import` writes them
QUERY_RUNS = 30
FOLDER_DOCS = 20_000  # into the full store
BULK_FOLDER_DOCS = 100_000  # into an empty store
EPOCH = datetime.date(2005, 1, 1)


class Corpus:
    """The generated dictionary and the draws that documents are made of (numpy, seeded)."""

    def __init__(self, concept_count, seed=7):
        self.rng = numpy.random.default_rng(seed)
        self.count = concept_count
        self.cuis = [f"C{index + 1:07d}" for index in range(concept_count)]
        self.vocabulary = [f"w{index}" for index in range(5000)]
        self.prefs = [f"{self._word()} {self._word()} {index}" for index in range(concept_count)]
        self.names = [pref.lower() for pref in self.prefs]  # an annotation's "str"
        # A 4-way tree: concept i's parent is (i - 1) // 4; a branch keeps its semantic group mostly.
        self.parents = {index: [(index - 1) // 4] for index in range(1, concept_count)}
        self.group = [0] * concept_count
        for index in range(1, concept_count):
            parent_group = self.group[(index - 1) // 4]
            self.group[index] = parent_group if self.rng.random() < 0.95 else int(self.rng.integers(len(GROUPS)))
        for index in self.rng.choice(numpy.arange(100, concept_count), concept_count // 20, replace=False):
            self.parents[int(index)].append(int(self.rng.integers(1, index)))  # a second parent, earlier
        self.parents[7] = self.parents.get(7, []) + [concept_count - 1]  # one cycle through the deepest level
        self.types = [GROUPS[group] for group in self.group]
        # Frequency falls with depth, as in reports (a lung is named more often than its apical segment):
        # ranks ordered by depth in the tree, shuffled within about two levels.
        depth = numpy.floor(numpy.log(3 * numpy.arange(concept_count) + 1) / numpy.log(4))
        ranks = numpy.argsort(numpy.argsort(depth + self.rng.uniform(0, 2, concept_count)))
        weights = 1.0 / (ranks + 1.0) ** ZIPF_EXPONENT
        self.probability = weights / weights.sum()
        self.word_probability = 1.0 / numpy.arange(1, len(self.vocabulary) + 1)
        self.word_probability /= self.word_probability.sum()

    def _word(self):
        return self.vocabulary[int(self.rng.integers(len(self.vocabulary)))]

    def children(self):
        children = {}
        for child, parents in self.parents.items():
            for parent in parents:
                children.setdefault(parent, []).append(child)
        return children

    def subtree(self, root, children):
        found, frontier = {root}, [root]
        while frontier:
            frontier = [child for node in frontier for child in children.get(node, ()) if child not in found]
            found.update(frontier)
        return found

    def pick_query_concept(self, doc_count, wanted_concepts=1000, wanted_docs=20_000):
        """The concept whose expansion is near `wanted_concepts` and whose documents are near `wanted_docs`."""
        children = self.children()
        best = None
        for root in range(1, min(self.count, 2000)):
            tree = self.subtree(root, children)
            if not 0.6 * wanted_concepts <= len(tree) <= 1.6 * wanted_concepts:
                continue
            mass = sum(self.probability[node] for node in tree if self.group[node] == self.group[root])
            expected_docs = doc_count * (1 - (1 - mass) ** ANNOTATIONS_PER_DOC)
            score = abs(numpy.log(expected_docs / wanted_docs)) + abs(numpy.log(len(tree) / wanted_concepts))
            if best is None or score < best[0]:
                best = (score, root, len(tree), expected_docs)
        return best[1:]

    def documents(self, first, count):
        """The fields of documents first … first+count-1 (a batch), with their annotations."""
        shape = (count, ANNOTATIONS_PER_DOC)
        # Python lists, not numpy arrays: reading numpy scalars one by one is what would cost here.
        draws = self.rng.choice(self.count, size=shape, p=self.probability).tolist()
        negation, experiencer, temporality = (
            [[values[index] for index in row] for row in self.rng.choice(len(values), size=shape, p=weights).tolist()]
            for values, weights in QUALIFIERS.values()
        )
        ruled = (self.rng.random(shape) < 0.02).tolist()
        days = self.rng.integers(0, 20 * 365, size=count).tolist()
        modality = self.rng.integers(len(MODALITIES), size=count).tolist()
        words = self.rng.choice(len(self.vocabulary), size=(count, WORDS_PER_TEXT), p=self.word_probability).tolist()
        cuis, prefs, names, types = self.cuis, self.prefs, self.names, self.types
        batch = []
        for row in range(count):
            number = first + row
            annotations = [
                {
                    "cui": cuis[concept],
                    "pref": prefs[concept],
                    "str": names[concept],
                    "sty": types[concept],
                    "start": column * 10,
                    "end": column * 10 + 8,
                    "negation": negation[row][column],
                    "experiencer": experiencer[row][column],
                    "temporality": temporality[row][column],
                    "ruled_by": ["not_mention_filters.json"] if ruled[row][column] else [],
                }
                for column, concept in enumerate(draws[row])
            ]
            batch.append(
                dict(
                    sop_instance_uid=f"2.25.9.{number}",
                    series_instance_uid=f"2.25.8.{number // 3}",
                    study_instance_uid=f"2.25.7.{number // 3}",
                    patient_id=f"P{number // 10}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.11",
                    content_date=EPOCH + datetime.timedelta(days=days[row]),
                    modalities_in_study=MODALITIES[modality[row]],
                    report_text=" ".join([self.vocabulary[word] for word in words[row]]),
                    annotations=annotations,
                    sentences=[{"start": 0, "end": 100}],
                )
            )
        return batch


def load_dictionary(corpus):
    rows = [{"cui": cui, "pref": pref} for cui, pref in zip(corpus.cuis, corpus.prefs)]
    types = [
        {"cui": cui, "sty": GROUPS[group].title(), "tui": None, "semantic_group": GROUPS[group]}
        for cui, group in zip(corpus.cuis, corpus.group)
    ]
    relations = [
        {"parent_cui": corpus.cuis[parent], "child_cui": corpus.cuis[child]}
        for child, parents in corpus.parents.items()
        for parent in set(parents)
    ]
    with write_engine().begin() as connection:
        connection.execute(concepts.insert(), rows)
        connection.execute(concept_types.insert(), types)
        connection.execute(concept_relations.insert(), relations)


def peak_rss_mb():
    """This process's peak resident memory. VmHWM, not getrusage: the query process is started by
    fork and exec from the importer, and Linux carries ru_maxrss across exec."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


_worker_corpus = None


def _start_generator(concept_count):
    global _worker_corpus
    _worker_corpus = Corpus(concept_count)  # the same dictionary as the main process's


def _generate_batch(first, count):
    """In the generator process: a batch of Documents, made (and so checked) as the importer's reader makes them."""
    return [Document(**fields) for fields in _worker_corpus.documents(first, count)]


def import_corpus(concept_count, doc_count):
    """Documents/s of the import while another process generates the batches (as the importer's reader
    process reads them): by the wall clock, which counts any wait for the generator, and by the time
    spent in import_documents alone."""
    in_import, done, known_prefs = 0.0, 0, set()
    started = time.perf_counter()

    def write(batch):
        nonlocal in_import, done
        batch_started = time.perf_counter()
        import_documents(batch, known_prefs)
        in_import += time.perf_counter() - batch_started
        done += len(batch)
        if done % 100_000 == 0 or done == doc_count:
            print(f"  {done:>9,} documents, {done / (time.perf_counter() - started):,.0f} docs/s so far", flush=True)

    with (
        loading(doc_count) as bulk,
        ProcessPoolExecutor(max_workers=1, initializer=_start_generator, initargs=(concept_count,)) as generator,
    ):
        print(f"  as a bulk load (the concept index built at the end): {bulk}", flush=True)
        pending = collections.deque()
        for first in range(0, doc_count, BATCH):
            pending.append(generator.submit(_generate_batch, first, min(BATCH, doc_count - first)))
            if len(pending) > 2:
                write(pending.popleft().result())
        while pending:
            write(pending.popleft().result())
        index_started = time.perf_counter()
    print(f"  concept index built in {time.perf_counter() - index_started:,.0f} s", flush=True)
    return doc_count / (time.perf_counter() - started), doc_count / in_import


def import_json_folder(corpus, folder, first, count):
    """Documents/s of import_folder on `count` generated files (NLP JSON, text, metadata)."""
    for subfolder in ("nlp", "text", "meta"):
        (folder / subfolder).mkdir(parents=True)
    for start in range(0, count, BATCH):
        batch = corpus.documents(first + start, min(BATCH, count - start))
        for document in map(lambda fields: Document(**fields), batch):
            stem = document.sop_instance_uid
            (folder / "nlp" / f"{stem}.json").write_text(
                json.dumps({"annotations": document.annotations, "sentences": document.sentences, "phenotypes": []})
            )
            (folder / "text" / f"{stem}.txt").write_text(document.report_text)
            meta = {
                "SOPInstanceUID": stem,
                "SeriesInstanceUID": document.series_instance_uid,
                "StudyInstanceUID": document.study_instance_uid,
                "PatientID": document.patient_id,
                "ContentDate": document.content_date.strftime("%Y%m%d"),
                "ModalitiesInStudy": document.modalities_in_study,
            }
            (folder / "meta" / f"{stem}.json").write_text(json.dumps(meta))
    started = time.perf_counter()
    summary = import_folder(folder / "nlp", folder / "text", folder / "meta", batch_size=BATCH)
    elapsed = time.perf_counter() - started
    assert summary.imported == count and not summary.skipped, summary
    return count / elapsed


def import_json_folder_into_empty_store(store, workdir, corpus, count):
    """import_json_folder's rate into a throwaway store that holds only the dictionary."""
    workdir.mkdir()
    try:
        with dictionary_store(store, workdir, corpus) as (app, _database_url), app.app_context():
            rate = import_json_folder(corpus, workdir / "folder", 0, count)
            db.engine.dispose()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rate


def run_queries(database_url, queries):
    """Child process: each query QUERY_RUNS times after one warm-up; prints JSON figures."""
    app = create_app({"DATABASE_URL": database_url, "STORAGE_DIR": tempfile.mkdtemp()})
    figures = {}
    with app.app_context():
        for name, (kind, query_json) in queries.items():
            search = search_documents if kind == "fulltext" else search_annotations
            count = len(search(parse_query(query_json)).all())
            times = []
            for _ in range(QUERY_RUNS):
                started = time.perf_counter()
                results = search(parse_query(query_json)).all()
                times.append((time.perf_counter() - started) * 1000)
                db.session.rollback()
                assert len(results) == count
            times.sort()
            figures[name] = {"results": count, "p50": statistics.median(times), "p95": times[int(0.95 * len(times)) - 1]}
    figures["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(figures))


@contextlib.contextmanager
def dictionary_store(store, workdir, corpus):
    """(app, database URL) of a throwaway database (in `workdir` for SQLite) with the schema and the
    corpus' dictionary; the database is dropped on exit."""
    with throwaway_database(store, workdir) as database_url:
        app = create_app({"DATABASE_URL": database_url, "STORAGE_DIR": str(workdir / "storage")})
        with app.app_context():
            init_db()
            load_dictionary(corpus)
        yield app, database_url


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=("sqlite", "postgresql"), required=True)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--concepts", type=int, default=100_000)
    parser.add_argument("--queries-only", metavar="DATABASE_URL", help=argparse.SUPPRESS)
    parser.add_argument("--queries", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.queries_only:
        run_queries(arguments.queries_only, json.loads(arguments.queries))
        return

    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        corpus = Corpus(arguments.concepts)
        root, tree_size, expected_docs = corpus.pick_query_concept(arguments.docs, wanted_docs=arguments.docs // 50)
        bulk_folder_docs = min(BULK_FOLDER_DOCS, arguments.docs)
        print(f"{arguments.store}: import_folder on {bulk_folder_docs:,} JSON files into an empty store", flush=True)
        bulk_folder_rate = import_json_folder_into_empty_store(
            arguments.store, workdir / "empty", corpus, bulk_folder_docs
        )
        with dictionary_store(arguments.store, workdir, corpus) as (app, database_url):
            measured = measure(arguments, corpus, app, database_url, workdir, root)
        report(arguments, corpus.cuis[root], tree_size, expected_docs, bulk_folder_docs, bulk_folder_rate, *measured)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(arguments, corpus, app, database_url, workdir, root):
    """(import rates, folder rate, importer peak RSS, query figures) on the store of `app`; the queries
    run in a child process that does nothing else."""
    with app.app_context():
        print(f"{arguments.store}: importing {arguments.docs:,} documents × {ANNOTATIONS_PER_DOC} annotations")
        import_rates = import_corpus(arguments.concepts, arguments.docs)
        folder_rate = import_json_folder(corpus, workdir / "folder", arguments.docs, FOLDER_DOCS)
        import_rss = peak_rss_mb()
        db.engine.dispose()
    analyse(database_url)

    cui = corpus.cuis[root]
    middle_concept = int(numpy.argsort(corpus.probability)[-300])  # a common concept, not the commonest
    # a word of the commonest concept's name, in the names of some 40 concepts: most documents
    common_word = corpus.prefs[int(numpy.argmax(corpus.probability))].split()[0]
    queries = {
        "single CUI": ("annotations", {"terms": [{"q": cui}]}),
        "qualifiers": (
            "annotations",
            {
                "terms": [{"q": cui, "negation": "Affirmed", "temporality": ["Recent"]}],
                "filter": {"start_date": "2010-01-01", "end_date": "2019-12-31", "modalities": ["CT", "MR"]},
            },
        ),
        "free text": ("annotations", {"terms": [{"q": corpus.prefs[middle_concept].upper()}]}),
        "free text word": ("annotations", {"terms": [{"q": common_word}]}),
        "search_docs": ("fulltext", {"terms": [{"q": "w30 w40"}]}),
    }
    child = subprocess.run(
        [sys.executable, __file__, "--store", arguments.store, "--queries-only", database_url,
         "--queries", json.dumps(queries)],
        check=True, capture_output=True, text=True,
    )
    return import_rates, folder_rate, import_rss, json.loads(child.stdout.strip().splitlines()[-1])


def report(arguments, cui, tree_size, expected_docs, bulk_folder_docs, bulk_folder_rate, import_rates, folder_rate,
           import_rss, figures):
    print(f"\n{arguments.store}, {arguments.docs:,} documents, {arguments.concepts:,} concepts, {os.cpu_count()} CPUs")
    print(f"  query concept {cui}: about {tree_size} concepts below it, about {expected_docs:,.0f} documents")
    print(f"  import_folder on {bulk_folder_docs:,} JSON files (+ text + meta) into an empty store: "
          f"{bulk_folder_rate:,.0f} docs/s")
    print(f"  import_folder on {FOLDER_DOCS:,} JSON files into the full store: {folder_rate:,.0f} docs/s; "
          f"importer peak RSS {import_rss:,.0f} MB")
    print(f"  import_documents alone (without waiting for the generator): {import_rates[1]:,.0f} docs/s")
    measured = {"import docs/s": import_rates[0], "query process peak RSS MB": figures.pop("peak_rss_mb")}
    for name, figure in figures.items():
        print(f"  {name}: {figure['results']:,} results, p50 {figure['p50']:.1f} ms, p95 {figure['p95']:.1f} ms")
        measured[f"{name} p50 ms"] = figure["p50"]
        measured[f"{name} p95 ms"] = figure["p95"]
    print()
    for name, (target, higher_is_better) in TARGETS.items():
        value = measured[name]
        met = value >= target if higher_is_better else value <= target
        print(f"  {name:<28} {value:>10,.1f}   target {'≥' if higher_is_better else '≤'} {target:,}   {'met' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
