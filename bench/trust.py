"""Trustworthy at run time: what one heavy or slow client costs everyone else, against `gateway serve`.

    .venv/bin/python bench/trust.py                                   # this checkout, SQLite
    .venv/bin/python bench/trust.py --store postgresql                # a throwaway database on 127.0.0.1:5432
    .venv/bin/python bench/trust.py --checkout ../older-checkout     # another source tree, same figures
    .venv/bin/python bench/trust.py --only text-query,download        # some scenarios only

The server is started as users start it, `gateway serve --bind 127.0.0.1:PORT` (whatever worker class and
timeout that checkout's `serve` picks), from the --checkout tree: its directory is the working directory
and first on PYTHONPATH, and the server's log must say that its `gateway` package came from there. The
store (SQLite file or PostgreSQL database, and a storage folder) is made for the run and removed at the
end, also on Ctrl-C or failure; it is seeded with the checkout's own CLI (`init-db`, `demo`, `concepts
load`, `annotations import` of generated files) and, for the download, uploads through the API.

Scenarios (each against a freshly started server on the same store, so one cannot leave work behind for
the next):

  text-query    1. a ~650 KB legal annotation query (100 terms x 600 free-text words), POSTed once
  stall-text    2. sequential simple queries (GET /api/search_anns/C0205076/) while 4 copies of 1. run
  stall-cohort  2. the same while 4 copies of a heavy cohort query run (expanded CUIs, qualifiers,
                   filters, every returnField) on the generated corpus
  rss           3. peak RSS of the worker processes over 100 search_docs of 100 terms x 1,000 items
  download      4. a ~100 MB series zip read by a throttled client over ~40 s, then two at once, with
                   simple requests (/api/v1/series/get/) meanwhile

Every request has a client time cap (--cap, 60 s); a request that hits it is reported as a timeout, with
the time it waited. Every loop is bounded in count and time; all traffic goes to 127.0.0.1. Progress goes
to stderr, the table to stdout.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEMO_AUTH = {"X-USERNAME": "demo", "X-PASSWORD": "demo"}
SIMPLE_CUI = "C0205076"  # Chest wall: in the demo's dictionary and reports
DEMO_UID_ROOT = "1.2.826.0.1.3680043.8.498.7770."
DEMO_STUDY = DEMO_UID_ROOT + "1.1.1"
SCENARIOS = ("text-query", "stall-text", "stall-cohort", "rss", "download")
CORPUS_SCENARIOS = {"stall-cohort", "rss"}
MB = 1e6
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STARTED = time.monotonic()

# Run the checkout's console script `gateway` (gateway.cli:main, as the installed script does) after saying
# which `gateway` package was imported, so that the run can prove it is the checkout's.
IMPORT_MARKER = "trust-bench: gateway imported from "
LAUNCHER = (
    "import sys, gateway\n"
    f"sys.stderr.write({IMPORT_MARKER!r} + gateway.__file__ + '\\n'); sys.stderr.flush()\n"
    "from gateway.cli import main\n"
    "sys.argv[0] = 'gateway'\n"
    "sys.exit(main())\n"
)


def progress(message):
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- the checkout, its CLI and its server -----------------------------------------------------------------


class Checkout:
    """A source tree run with its own `gateway` package, against the run's store."""

    def __init__(self, path, database_url, storage_dir):
        self.path = Path(path).resolve()
        if not (self.path / "gateway" / "cli.py").is_file():
            raise SystemExit(f"{self.path} holds no gateway/cli.py: not a checkout of the gateway")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("GATEWAY_") and k not in ("PYTHONPATH", "PYTHONHOME", "FLASK_APP", "FLASK_ENV")}
        env.update(PYTHONPATH=str(self.path), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                   GATEWAY_DATABASE_URL=database_url, GATEWAY_STORAGE_DIR=str(storage_dir))
        self.env = env

    def command(self, *arguments):
        return [sys.executable, "-c", LAUNCHER, *arguments]

    def verify_import(self, text, what):
        found = [line.split(IMPORT_MARKER, 1)[1].strip() for line in text.splitlines() if IMPORT_MARKER in line]
        expected = str(self.path / "gateway" / "__init__.py")
        if not found or Path(found[0]).resolve() != Path(expected):
            raise RuntimeError(f"{what}: imported gateway from {found[:1] or 'nowhere'}, not {expected}")
        return found[0]

    def cli(self, *arguments, stdin=None, timeout=600):
        """Run `gateway ARGUMENTS` of the checkout; its output, or RuntimeError with it."""
        started = time.monotonic()
        finished = subprocess.run(self.command(*arguments), cwd=self.path, env=self.env, input=stdin,
                                  capture_output=True, text=True, timeout=timeout)
        self.verify_import(finished.stderr, f"gateway {arguments[0]}")
        output = (finished.stdout + finished.stderr).strip()
        if finished.returncode != 0:
            raise RuntimeError(f"gateway {' '.join(arguments)} exited {finished.returncode}:\n{output[-3000:]}")
        last = [line for line in finished.stdout.strip().splitlines() if line.strip()][-1:] or [""]
        progress(f"  gateway {' '.join(arguments[:2])}: {last[0][:120]} ({time.monotonic() - started:.1f} s)")
        return output


def _proc_stat(pid):
    """Fields of /proc/PID/stat after the command name: state, ppid, …"""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _descendants(root):
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children[int(_proc_stat(entry)[1])].append(int(entry))
    found, frontier = [], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children.get(pid, ())]
        found.extend(frontier)
    return found


def _status_kb(pid, key):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid):
    fields = _proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Server:
    """`gateway serve --bind 127.0.0.1:PORT` of a checkout, with a sampler of its worker processes."""

    def __init__(self, checkout, log_path):
        self.checkout, self.log_path = checkout, log_path
        self.master = None
        self.samples = {}  # pid: {"hwm": kB, "rss": max kB, "cpu": last CPU s}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = None

    def start(self):
        with socket.socket() as probe:  # a free port; the race until the server binds it is harmless here
            probe.bind((HOST, 0))
            self.port = probe.getsockname()[1]
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()
        self.master = subprocess.Popen(self.checkout.command("serve", "--bind", f"{HOST}:{self.port}"),
                                       cwd=self.checkout.path, env=self.checkout.env, stdout=self._log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.master.poll() is not None:
                raise RuntimeError(f"gateway serve exited {self.master.returncode}:\n{self.log_tail()}")
            outcome = call(self.port, "GET", "/api/need_passphrase/", cap=5)
            if outcome.status == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway serve not answering after 60 s ({outcome.label}):\n{self.log_tail()}")
            time.sleep(0.2)
        self.imported_from = self.checkout.verify_import(self.log_text(), "gateway serve")
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        time.sleep(0.5)  # let every worker boot (their number is whatever serve chose)
        return self

    def workers(self):
        """The worker processes: the master's descendants (the master itself if it has none)."""
        return _descendants(self.master.pid) or [self.master.pid]

    def _sample(self):
        while not self._stop.is_set():
            for pid in self.workers():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    hwm, rss, cpu = _status_kb(pid, "VmHWM"), _status_kb(pid, "VmRSS"), _cpu_seconds(pid)
                    with self._lock:
                        sample = self.samples.setdefault(pid, {"hwm": 0, "rss": 0, "cpu": 0.0, "first": time.monotonic()})
                        sample.update(hwm=max(sample["hwm"], hwm), rss=max(sample["rss"], rss), cpu=cpu)
            self._stop.wait(0.1)

    def snapshot(self):
        with self._lock:
            return {pid: dict(sample) for pid, sample in self.samples.items()}

    def cpu_total(self):
        """CPU seconds of every worker process seen so far (a dead one: its last sample)."""
        return sum(sample["cpu"] for sample in self.snapshot().values())

    def log_text(self):
        with contextlib.suppress(OSError):
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        return ""

    def log_tail(self, lines=25):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def event_counts(self):
        """What the server log says happened to workers since it started (timeouts, kills, tracebacks)."""
        text = self.log_text()
        return {
            "worker timeouts": len(re.findall(r"WORKER TIMEOUT", text)),
            "workers killed": len(re.findall(r"was sent SIG(?:KILL|ABRT)|Worker \(pid:\d+\) exited", text)),
            "tracebacks": len(re.findall(r"^Traceback", text, re.M)),
        }

    def events(self, since=None):
        """event_counts (those since the counts `since`) as a note; "" when nothing happened."""
        counts = self.event_counts()
        since = since or {}
        return ", ".join(f"{name} {count - since.get(name, 0)}" for name, count in counts.items()
                         if count - since.get(name, 0))

    def stop(self):
        if self.master is None:
            return
        self._stop.set()
        pids = self.workers() if self.master.poll() is None else []
        if self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)
            try:
                self.master.wait(timeout=8)
            except subprocess.TimeoutExpired:
                for pid in [self.master.pid, *pids]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.master.wait(timeout=10)
        for pid in pids:  # workers left behind by a master that was killed
            with contextlib.suppress(ProcessLookupError):
                if Path(f"/proc/{pid}").exists() and int(_proc_stat(pid)[1]) in (1, self.master.pid):
                    os.kill(pid, signal.SIGKILL)
        if self._sampler is not None:
            self._sampler.join(timeout=2)
        self._log.close()
        self.master = None


# --- one HTTP request, bounded in time -------------------------------------------------------------------


class _Connection(http.client.HTTPConnection):
    """http.client's connection, keeping its socket (and an optional small receive buffer)."""

    def __init__(self, *args, receive_buffer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.receive_buffer = receive_buffer

    def connect(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.receive_buffer:  # before connect, so the window the server sees is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw_socket = self.sock


class Outcome:
    def __init__(self, status, seconds, size, error=None, head=b""):
        self.status, self.seconds, self.size, self.error, self.head = status, seconds, size, error, head

    @property
    def label(self):
        if self.error and self.status:
            return f"{self.status}+{self.error}"
        return self.error or str(self.status)

    @property
    def ok(self):
        return self.status == 200 and not self.error


def call(port, method, path, body=None, headers=None, cap=60.0, sink=None, pace=None, chunk=65536,
         receive_buffer=None, keep_head=400):
    """One request on a new connection; the whole of it (connect, send, wait, read) capped at `cap` s.

    sink: a file the answer is written to; pace: bytes/s the answer is read at (small reads, sleeps).
    """
    started = time.monotonic()
    deadline = started + cap
    connection = _Connection(HOST, port, timeout=cap, receive_buffer=receive_buffer)
    status, size, head = None, 0, bytearray()
    try:
        connection.request(method, path, body=body, headers=headers or {})
        sock = connection.raw_socket
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        response = connection.getresponse()
        status = response.status
        body_started = time.monotonic()
        while True:
            if response.isclosed():  # the whole answer read (its socket is closed then)
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = response.read(chunk)
            if not data:
                break
            size += len(data)
            if len(head) < keep_head:
                head += data[:keep_head - len(head)]
            if sink is not None:
                sink.write(data)
            if pace:
                wait = body_started + size / pace - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
        return Outcome(status, time.monotonic() - started, size, None, bytes(head))
    except (TimeoutError, socket.timeout):
        return Outcome(status, time.monotonic() - started, size, "timeout", bytes(head))
    except http.client.IncompleteRead as error:
        size += len(error.partial)
        return Outcome(status, time.monotonic() - started, size, "truncated", bytes(head))
    except (ConnectionError, http.client.HTTPException, OSError) as error:
        name = type(error).__name__ if type(error) is not OSError else f"OSError {error.errno}"
        return Outcome(status, time.monotonic() - started, size, name, bytes(head))
    finally:
        connection.close()


def statuses(outcomes):
    counts = collections.Counter(outcome.label for outcome in outcomes)
    return ", ".join(f"{label} x{count}" for label, count in sorted(counts.items()))


def latency_text(outcomes):
    if not outcomes:
        return "no requests"
    times = sorted(outcome.seconds for outcome in outcomes)
    return f"p50 {statistics.median(times) * 1000:,.0f} ms, max {times[-1]:,.2f} s"


def simple_search_path():
    return f"/api/search_anns/{SIMPLE_CUI}/"


def simple_loop(port, path, headers, stop, cap, max_seconds, max_count=3000, gap=0.05):
    """Sequential simple requests until `stop` is set (or the bounds): their outcomes."""
    outcomes, started = [], time.monotonic()
    while not stop.is_set() and len(outcomes) < max_count and time.monotonic() - started < max_seconds:
        outcomes.append(call(port, "GET", path, headers=headers, cap=cap))
        stop.wait(gap)
    return outcomes


def in_parallel(functions):
    """Run each function in a thread; returns (threads, results list filled as they end)."""
    results = [None] * len(functions)

    def run(index, function):
        results[index] = function()

    threads = [threading.Thread(target=run, args=(index, function), daemon=True) for index, function in enumerate(functions)]
    for thread in threads:
        thread.start()
    return threads, results


def join_all(threads, timeout):
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


def under_load(server, heavy_calls, simple_path, simple_headers, cap, bound):
    """Start the heavy calls in parallel; meanwhile simple requests, until every heavy call ended."""
    stop = threading.Event()
    simple = {}
    simple_thread = threading.Thread(
        target=lambda: simple.setdefault("outcomes", simple_loop(server.port, simple_path, simple_headers, stop, cap, bound)),
        daemon=True)
    threads, results = in_parallel(heavy_calls)
    time.sleep(0.2)  # the heavy requests are sent first
    simple_thread.start()
    join_all(threads, bound)
    stop.set()
    simple_thread.join(cap + 5)
    return results, simple.get("outcomes", [])


# --- generated data ----------------------------------------------------------------------------------------

SYLLABLES = ("ba", "ce", "di", "fo", "gu", "ha", "je", "ki", "lo", "mu", "na", "pe", "ri", "so", "tu", "va",
             "we", "xi", "yo", "za", "bro", "cla", "dre", "fli", "gro", "pla", "stri", "tho")
GROUP_TUIS = (("T023", "Body Part, Organ, or Organ Component"), ("T047", "Disease or Syndrome"),
              ("T061", "Therapeutic or Preventive Procedure"), ("T033", "Finding"))
MODALITIES = ("CT", "MR", "CR", "DX", "US", "CT\\SR", "MR\\SR", "CR\\DX", "PT\\CT", "MG", "NM", "XA")
QUALIFIERS = {
    "negation": (("Affirmed", "Negated"), (0.8, 0.2)),
    "experiencer": (("Patient", "Other"), (0.95, 0.05)),
    "temporality": (("Recent", "historical", "hypothetical"), (0.85, 0.1, 0.05)),
}
RETURN_FIELDS = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "SOPClassUID",
                 "ContentDate", "ModalitiesInStudy"]


def pseudo_words(rng, count, minimum, maximum):
    """`count` distinct lower-case words of minimum..maximum letters, made of syllables."""
    words = set()
    while len(words) < count:
        word = ""
        while len(word) < minimum:
            word += rng.choice(SYLLABLES)
        words.add(word[:maximum])
    return sorted(words)


class Corpus:
    """A generated dictionary (a 4-way tree of concepts, a semantic group per top branch) and documents of
    20 annotations (CUIs drawn Zipf-like, the shallower the commoner), qualifiers, dates, modalities, text."""

    ANNOTATIONS = 20
    WORDS_PER_TEXT = 40

    def __init__(self, concept_count, seed=11):
        self.rng = random.Random(seed)
        rng = self.rng
        self.count = concept_count
        self.cuis = [f"C9{index:07d}" for index in range(concept_count)]
        self.vocabulary = pseudo_words(rng, 3000, 5, 9)
        self.parent = [None] + [(index - 1) // 4 for index in range(1, concept_count)]
        self.depth = [0] * concept_count
        self.group = [0] * concept_count
        for index in range(1, concept_count):
            parent = self.parent[index]
            self.depth[index] = self.depth[parent] + 1
            if parent == 0:
                self.group[index] = (index - 1) % len(GROUP_TUIS)
            else:
                self.group[index] = self.group[parent] if rng.random() < 0.95 else rng.randrange(len(GROUP_TUIS))
        self.prefs = [f"{rng.choice(self.vocabulary)} {rng.choice(self.vocabulary)} {index}" for index in range(concept_count)]
        order = sorted(range(concept_count), key=lambda index: self.depth[index] + rng.uniform(0, 2))
        weights = [0.0] * concept_count
        for rank, index in enumerate(order):
            weights[index] = 1.0 / (rank + 1.0) ** 1.2
        self.cum_concepts = list(_accumulate(weights))
        self.cum_words = list(_accumulate(1.0 / (rank + 1.0) for rank in range(len(self.vocabulary))))

    def write_dictionary(self, folder, sample_folder):
        """SemEHR CSV files (cui, rel, snomed, sty) of the checkout's sample dictionary plus this one's concepts."""
        folder.mkdir(parents=True)
        headers = {"cui.csv": "cui|tui|tuigroup|cuilabel", "rel.csv": "cui1|has|cui2", "snomed.csv": "snomed|cui",
                   "sty.csv": "tui|tuigroup|tuigrouplabel"}
        for name, header in headers.items():
            sample = sample_folder / name
            lines = sample.read_text(encoding="utf-8").splitlines() if sample.is_file() else [header]
            (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        groups = ("ANAT", "DISO", "PROC", "DISO")
        sty = (folder / "sty.csv").read_text(encoding="utf-8")
        with open(folder / "sty.csv", "a", encoding="utf-8") as out:
            for (tui, _name), group in zip(GROUP_TUIS, groups):
                if f"\n{tui}|" not in "\n" + sty:
                    out.write(f"{tui}|{group}|{group.title()}\n")
        with open(folder / "cui.csv", "a", encoding="utf-8") as out:
            for index, cui in enumerate(self.cuis):
                out.write(f"{cui}|{GROUP_TUIS[self.group[index]][0]}|{groups[self.group[index]]}|{self.prefs[index]}\n")
        with open(folder / "rel.csv", "a", encoding="utf-8") as out:
            for parent in range(self.count):
                children = [child for child in range(4 * parent + 1, 4 * parent + 5) if child < self.count]
                if children:
                    out.write(f"{self.cuis[parent]}|RN|{','.join(self.cuis[child] for child in children)}\n")

    def write_documents(self, folder, count):
        """NLP result files (their DICOM metadata at the top, as the importer reads it when there is no
        metadata file) and report texts of `count` documents, for `annotations import`."""
        rng = self.rng
        for sub in ("nlp", "text"):
            (folder / sub).mkdir(parents=True)
        epoch = datetime.date(2005, 1, 1)
        qualifier_draws = {name: (values, list(_accumulate(weights))) for name, (values, weights) in QUALIFIERS.items()}

        def write(path, text):
            with open(path, "w", encoding="utf-8") as out:
                out.write(text)

        # creating a file is most of the cost here, and the system call lets other threads run meanwhile
        with concurrent.futures.ThreadPoolExecutor(4) as writers:
            pending = collections.deque()
            for number in range(count):
                concepts = rng.choices(range(self.count), cum_weights=self.cum_concepts, k=self.ANNOTATIONS)
                qualifiers = {name: rng.choices(values, cum_weights=cum, k=self.ANNOTATIONS)
                              for name, (values, cum) in qualifier_draws.items()}
                annotations = [
                    {"cui": self.cuis[concept], "pref": self.prefs[concept], "str": self.prefs[concept].lower(),
                     "sty": GROUP_TUIS[self.group[concept]][1], "start": column * 10, "end": column * 10 + 8,
                     "negation": qualifiers["negation"][column], "experiencer": qualifiers["experiencer"][column],
                     "temporality": qualifiers["temporality"][column],
                     "ruled_by": ["not_mention_filters.json"] if rng.random() < 0.02 else []}
                    for column, concept in enumerate(concepts)
                ]
                stem = f"2.25.77.{number}"
                nlp = {
                    "SOPInstanceUID": stem, "SeriesInstanceUID": f"2.25.78.{number // 3}",
                    "StudyInstanceUID": f"2.25.79.{number // 3}", "PatientID": f"TRUST-P{number // 10}",
                    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.11",
                    "ContentDate": (epoch + datetime.timedelta(days=rng.randrange(20 * 365))).strftime("%Y%m%d"),
                    "ModalitiesInStudy": rng.choice(MODALITIES),
                    "annotations": annotations, "sentences": [{"start": 0, "end": 100}], "phenotypes": [],
                }
                words = rng.choices(self.vocabulary, cum_weights=self.cum_words, k=self.WORDS_PER_TEXT)
                pending.append(writers.submit(write, folder / "nlp" / f"{stem}.json", json.dumps(nlp)))
                pending.append(writers.submit(write, folder / "text" / f"{stem}.txt", " ".join(words) + "."))
                while len(pending) > 200:
                    pending.popleft().result()
            for future in pending:
                future.result()

    def cohort_query(self, terms, cuis_per_term):
        """A cohort query as a query builder makes it from code lists: each term any of `cuis_per_term`
        broad concepts (expanded to their narrower ones), affirmed, of the patient, recent or historical;
        the last term excludes; a date range, modalities and every returnField."""
        broad = [index for index in range(self.count) if 1 <= self.depth[index] <= 5]
        query_terms = []
        for number in range(terms):
            picked = random.Random(number).sample(broad, min(cuis_per_term, len(broad)))
            q = ",".join(self.cuis[index] for index in picked)
            term = {"q": q, "negation": "Affirmed", "experiencer": "Patient", "temporality": ["Recent", "historical"]}
            if number == terms - 1 and terms > 1:
                deep = [index for index in range(self.count) if self.depth[index] >= 6]
                excluded = random.Random(-1).sample(deep, min(cuis_per_term, len(deep)))
                term = {"q": "-" + ",".join(self.cuis[index] for index in excluded), "negation": "Affirmed"}
            query_terms.append(term)
        return {"terms": query_terms,
                "filter": {"start_date": "2006-01-01", "end_date": "2024-06-30", "modalities": ["CT", "MR", "CR", "DX", "US"]},
                "returnFields": RETURN_FIELDS}

    def search_docs_query(self, terms, items):
        """search_docs: `terms` terms (ANDed) of `items` report words each (ORed)."""
        words = self.vocabulary
        return {"terms": [{"q": ",".join(random.Random(1000 + number).sample(words, min(items, len(words))))}
                          for number in range(terms)]}


def _accumulate(values):
    total = 0.0
    for value in values:
        total += value
        yield total


def long_text_query(terms=100, words=600, seed=5):
    """Query 1: `terms` terms of `words` free-text words each, all distinct legal-looking words."""
    rng = random.Random(seed)
    vocabulary = pseudo_words(rng, terms * words, 9, 10)
    rng.shuffle(vocabulary)
    return {"terms": [{"q": ",".join(vocabulary[number * words:(number + 1) * words])} for number in range(terms)]}


# --- the store -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_store(store, workdir):
    """(database URL, storage folder) made for the run; removed on exit."""
    storage = workdir / "storage"
    if store == "sqlite":
        yield f"sqlite:///{workdir / 'gateway.sqlite'}", storage
        return
    import sqlalchemy

    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"gateway_trust_{secrets.token_hex(5)}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    progress(f"created PostgreSQL database {name}")
    try:
        yield sqlalchemy.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False), storage
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        progress(f"dropped PostgreSQL database {name}")


def seed(checkout, workdir, arguments, needs_corpus):
    """The checkout's own CLI: schema, demo data and, if needed, the generated dictionary and corpus."""
    checkout.cli("init-db")
    checkout.cli("demo")
    if not needs_corpus:
        return None
    started = time.monotonic()
    corpus = Corpus(arguments.concepts)
    sample = checkout.path / "gateway" / "annotations" / "sample_dictionary"
    corpus.write_dictionary(workdir / "dictionary", sample)
    checkout.cli("concepts", "load", "--semehr-csv-dir", str(workdir / "dictionary"))
    progress(f"  writing {arguments.docs:,} annotated documents")
    corpus.write_documents(workdir / "corpus", arguments.docs)
    folder = workdir / "corpus"
    output = checkout.cli("annotations", "import", "--json-dir", str(folder / "nlp"), "--text-dir", str(folder / "text"))
    if not re.search(rf"imported {arguments.docs}\b", output):
        raise RuntimeError(f"the corpus import did not import {arguments.docs} documents:\n{output[-1000:]}")
    shutil.rmtree(folder, ignore_errors=True)
    progress(f"  corpus ready in {time.monotonic() - started:.0f} s")
    return corpus


# --- the scenarios ------------------------------------------------------------------------------------------


def json_post(server, path, query, cap):
    body = json.dumps(query).encode()
    return call(server.port, "POST", path, body=body, headers={"Content-Type": "application/json"}, cap=cap)


def _head_note(outcome):
    if outcome.ok or not outcome.head:
        return ""
    text = outcome.head.decode(errors="replace")
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        text = json.loads(text).get("message", text)
    text = " ".join(re.sub(r"<[^>]*>", " ", text).split())  # an HTML error page as its words
    return f'; answer: "{text[:110]}"'


def busy_after(server, cap):
    """Seconds the workers kept using CPU after now (until idle for 1.5 s, or `cap`)."""
    started = last_busy = time.monotonic()
    before = server.cpu_total()
    while time.monotonic() - started < cap:
        time.sleep(0.5)
        now = server.cpu_total()
        if now - before > 0.1:
            last_busy = time.monotonic()
        elif time.monotonic() - last_busy >= 1.5:
            break
        before = now
    busy = last_busy - started
    return f"{busy:.0f} s" if time.monotonic() - started < cap else f"still busy after {cap:.0f} s"


def scenario_text_query(context, server):
    query = long_text_query()
    body_kb = len(json.dumps(query).encode()) / 1000
    progress(f"  POST /api/search_anns/x of {body_kb:,.0f} KB (100 terms x 600 words), cap {context.cap:.0f} s")
    outcome = json_post(server, "/api/search_anns/x/", query, context.cap)
    progress(f"  -> {outcome.label} after {outcome.seconds:.1f} s")
    after = busy_after(server, 20)
    events = server.events()
    value = f"{outcome.seconds:.1f} s" + (" (timeout)" if outcome.error == "timeout" else "")
    return [("1. long text query: time to answer", value,
             f"status {outcome.label}, {body_kb:,.0f} KB body, {outcome.size:,} B answer{_head_note(outcome)}; "
             f"workers busy {after} after it{'; ' + events if events else ''}")]


def _stall(context, server, label, query, heavy_path):
    baseline = [call(server.port, "GET", simple_search_path(), cap=context.cap) for _ in range(20)]
    body_kb = len(json.dumps(query).encode()) / 1000
    progress(f"  idle: simple query {latency_text(baseline)}; now 4 x {label} ({body_kb:,.0f} KB each) in parallel")
    heavy = [lambda: json_post(server, heavy_path, query, context.cap) for _ in range(4)]
    mark = server.event_counts()
    results, simple = under_load(server, heavy, simple_search_path(), None, context.cap, context.cap + 15)
    results = [result for result in results if result is not None]
    progress(f"  heavy: {statuses(results)}; simple: {len(simple)} requests, {latency_text(simple)}, {statuses(simple)}")
    events = server.events(mark)
    context.simple_waits.append((f"2. during 4 x {label}", max((o.seconds for o in simple), default=0)))
    heavy_times = ", ".join(f"{result.seconds:.1f}" for result in results)
    return [
        (f"2. simple query p50/max, idle (before {label.split(' (')[0]})", latency_text(baseline), f"{len(baseline)} sequential, {statuses(baseline)}"),
        (f"2. simple query p50/max during 4 x {label}", latency_text(simple),
         f"{len(simple)} sequential: {statuses(simple)}; heavy: {statuses(results)} in {heavy_times} s"
         f"{_head_note(next((r for r in results if not r.ok), results[0])) if results else ''}"
         f"{'; ' + events if events else ''}"),
        (f"2. service stall during 4 x {label}", f"{max((o.seconds for o in simple), default=0):.2f} s",
         "the longest any simple request waited" + (" (hit the client cap)" if any(o.error == "timeout" for o in simple) else "")),
    ]


def scenario_stall_text(context, server):
    return _stall(context, server, "query 1", long_text_query(), "/api/search_anns/x/")


def scenario_stall_cohort(context, server):
    query = context.corpus.cohort_query(context.arguments.cohort_terms, context.arguments.cohort_cuis)
    label = f"cohort query ({context.arguments.cohort_terms} terms x {context.arguments.cohort_cuis} CUIs)"
    # one untimed run first: its size and how long it takes alone
    alone = json_post(server, "/api/search_anns/json/", query, context.cap)
    after = busy_after(server, 30)
    progress(f"  cohort query alone: {alone.label} after {alone.seconds:.1f} s, {alone.size / MB:.1f} MB answer; "
             f"workers busy {after} after it")
    rows = _stall(context, server, label, query, "/api/search_anns/json/")
    rows.insert(0, ("2. cohort query alone: time", f"{alone.seconds:.1f} s",
                    f"status {alone.label}, {alone.size / MB:,.1f} MB answer on {context.arguments.docs:,} documents, "
                    f"every returnField, qualifiers, date and modality filter{_head_note(alone)}; "
                    f"workers busy {after} after it"))
    return rows


def scenario_rss(context, server):
    idle = max((sample["rss"] for sample in server.snapshot().values()), default=0) / 1024
    items = 1000
    while True:
        query = context.corpus.search_docs_query(100, items)
        probe = json_post(server, "/api/search_docs/x/", query, context.cap)
        progress(f"  search_docs 100 terms x {items} items ({len(json.dumps(query)) / 1000:,.0f} KB): "
                 f"{probe.label} after {probe.seconds:.1f} s")
        if probe.status != 400 or items <= 50:
            break
        items //= 2  # refused as too large or invalid: the largest the server accepts
    body_kb = len(json.dumps(query).encode()) / 1000
    outcomes, started, lock = [probe], time.monotonic(), threading.Lock()

    def client():
        while time.monotonic() - started < context.arguments.rss_seconds:
            with lock:
                if len(outcomes) >= 100:
                    return
                outcomes.append(None)
                slot = len(outcomes) - 1
            outcomes[slot] = json_post(server, "/api/search_docs/x/", query, context.cap)

    threads, _ = in_parallel([client, client])
    join_all(threads, context.arguments.rss_seconds + context.cap + 10)
    time.sleep(0.3)  # a last sample
    done = [outcome for outcome in outcomes if outcome is not None]
    samples = server.snapshot()
    peaks = sorted(sample["hwm"] / 1024 for sample in samples.values())
    peak = peaks[-1] if peaks else 0
    events = server.events()
    progress(f"  {len(done)} requests in {time.monotonic() - started:.0f} s: {statuses(done)}; peak VmHWM {peak:.0f} MiB")
    return [("3. worker peak RSS over search_docs", f"{peak:,.0f} MiB",
             f"{len(done)} x 100 terms x {items} items ({body_kb:,.0f} KB), 2 clients, bound 100 requests or "
             f"{context.arguments.rss_seconds:.0f} s: {statuses(done)}, {latency_text(done)}; idle worker VmRSS "
             f"{idle:.0f} MiB; {len(peaks)} worker processes seen, VmHWM {peaks[0]:.0f}..{peak:.0f} MiB"
             f"{_head_note(next((o for o in done if not o.ok), done[0]))}{'; ' + events if events else ''}")]


def _multipart(fields, dicom):
    boundary = secrets.token_hex(16)
    parts = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                     for name, value in fields.items())
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n").encode()
    return parts + head + dicom + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload_series(context, server, count):
    """`count` CT-sized instances of one new series, uploaded as demo/demo by 2 clients; its parameters."""
    sys.path.insert(0, str(context.checkout.path))
    from gateway.synthetic import make_instance  # the checkout's own generator

    if not Path(sys.modules["gateway"].__file__).resolve().is_relative_to(context.checkout.path):
        raise RuntimeError(f"gateway.synthetic came from {sys.modules['gateway'].__file__}, not the checkout")
    study = DEMO_UID_ROOT + "99.1"
    series = {"Project": "demo", "Archive": "main", "PatientID": "TRUST-DL", "StudyInstanceUID": study,
              "SeriesInstanceUID": study + ".1"}
    failures, sent, lock = [], [0], threading.Lock()

    def client(numbers):
        for number in numbers:
            dicom = make_instance("TRUST-DL", study, study + ".1", f"{study}.1.{number}", rows=512, columns=512,
                                  instance_number=number + 1, pixel_seed=number)
            body, content_type = _multipart({"Project": "demo", "Archive": "main"}, dicom)
            outcome = call(server.port, "POST", "/api/v1/instance/upload/", body=body,
                           headers={**DEMO_AUTH, "Content-Type": content_type}, cap=context.cap)
            with lock:
                if outcome.ok:
                    sent[0] += len(dicom)
                else:
                    failures.append(f"{outcome.label}{_head_note(outcome)}")

    started = time.monotonic()
    threads, _ = in_parallel([lambda: client(range(0, count, 2)), lambda: client(range(1, count, 2))])
    join_all(threads, 240)
    progress(f"  uploaded {count - len(failures)}/{count} instances, {sent[0] / MB:.0f} MB in "
             f"{time.monotonic() - started:.0f} s" + (f"; failed: {failures[:3]}" if failures else ""))
    if len(failures) == count:
        raise RuntimeError(f"no upload succeeded: {failures[:3]}")
    return series, count - len(failures)


def _zip_check(path, entries_expected):
    try:
        with zipfile.ZipFile(path) as archive:
            bad, entries = archive.testzip(), len(archive.infolist())
        return "valid" if bad is None and entries == entries_expected else f"{entries} entries, bad {bad}"
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"invalid ({type(error).__name__})"


def scenario_download(context, server):
    count = context.arguments.instances
    series, stored = upload_series(context, server, count)
    path = "/api/v1/dicom/get/?" + urllib.parse.urlencode(series)
    reference_path = context.workdir / "reference.zip"
    with open(reference_path, "wb") as sink:
        reference = call(server.port, "GET", path, headers=DEMO_AUTH, cap=context.cap, sink=sink, chunk=1 << 20)
    if not reference.ok:
        raise RuntimeError(f"the fast download failed: {reference.label}{_head_note(reference)}")
    expected = reference.size
    digest = hashlib.sha256(reference_path.read_bytes()).hexdigest()
    reference_check = _zip_check(reference_path, stored)
    reference_path.unlink()
    pace = expected / context.arguments.download_seconds
    progress(f"  fast download: {expected / MB:.1f} MB in {reference.seconds:.1f} s, zip {reference_check}; "
             f"now read at {pace / MB:.2f} MB/s (~{context.arguments.download_seconds:.0f} s)")
    simple_path = "/api/v1/series/get/?" + urllib.parse.urlencode({
        "Project": "demo", "Archive": "main", "PatientID": "DEMO-001", "StudyInstanceUID": DEMO_STUDY,
        "SeriesInstanceUID": DEMO_STUDY + ".2"})
    baseline = [call(server.port, "GET", simple_path, headers=DEMO_AUTH, cap=context.cap) for _ in range(20)]
    rows = [("4. series/get p50/max, idle", latency_text(baseline), f"{len(baseline)} sequential, {statuses(baseline)}")]
    cap = context.arguments.download_seconds * 2 + 20
    for parallel in (1, 2):
        mark = server.event_counts()
        sinks = [context.workdir / f"slow-{parallel}-{number}.zip" for number in range(parallel)]

        def slow(target):
            with open(target, "wb") as sink:
                return call(server.port, "GET", path, headers=DEMO_AUTH, cap=cap, sink=sink, pace=pace,
                            chunk=16384, receive_buffer=65536)

        results, simple = under_load(server, [lambda target=target: slow(target) for target in sinks],
                                     simple_path, DEMO_AUTH, context.cap, cap + 5)
        parts = []
        for target, result in zip(sinks, results):
            if result is None:
                parts.append("still running at the bound")
                continue
            complete = result.size == expected and hashlib.sha256(target.read_bytes()).hexdigest() == digest
            parts.append(f"{'COMPLETE' if complete else 'INCOMPLETE'} {result.size / MB:.1f}/{expected / MB:.1f} MB "
                         f"in {result.seconds:.1f} s ({result.label}), zip {_zip_check(target, stored)}")
            target.unlink(missing_ok=True)
        events = server.events(mark)
        completed = sum(part.startswith("COMPLETE") for part in parts)
        progress(f"  {parallel} slow download(s): {'; '.join(parts)}; simple: {latency_text(simple)}, {statuses(simple)}")
        context.simple_waits.append((f"4. during {parallel} slow download(s)", max((o.seconds for o in simple), default=0)))
        what = "one slow download" if parallel == 1 else "two slow downloads at once"
        rows.append((f"4. {what}: completed", f"{completed}/{parallel}", "; ".join(parts)))
        rows.append((f"4. series/get p50/max during {what}", latency_text(simple),
                     f"{len(simple)} sequential: {statuses(simple)}{'; ' + events if events else ''}"))
    return rows


SCENARIO_FUNCTIONS = {
    "text-query": scenario_text_query,
    "stall-text": scenario_stall_text,
    "stall-cohort": scenario_stall_cohort,
    "rss": scenario_rss,
    "download": scenario_download,
}


# --- report ------------------------------------------------------------------------------------------------


def print_table(title, rows):
    widths = [max(len(row[column]) for row in rows + [("figure", "value", "note")]) for column in (0, 1)]
    print(f"\n{title}")
    print(f"{'figure':<{widths[0]}}  {'value':<{widths[1]}}  note")
    print(f"{'-' * widths[0]}  {'-' * widths[1]}  ----")
    for figure, value, note in rows:
        print(f"{figure:<{widths[0]}}  {value:<{widths[1]}}  {note}")
    sys.stdout.flush()


def _interrupt(_signal, _frame):
    raise KeyboardInterrupt


class Context:
    def __init__(self, arguments, checkout, workdir, corpus):
        self.arguments, self.checkout, self.workdir, self.corpus = arguments, checkout, workdir, corpus
        self.cap = arguments.cap
        self.simple_waits = []


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--checkout", default=str(REPO), help="source tree to run (default: this repository)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--cap", type=float, default=60.0, help="client time cap of each request, s")
    parser.add_argument("--docs", type=int, default=30_000, help="generated annotated documents")
    parser.add_argument("--concepts", type=int, default=20_000, help="generated dictionary concepts")
    parser.add_argument("--cohort-terms", type=int, default=3, help="terms of the cohort query, the last one excluding")
    parser.add_argument("--cohort-cuis", type=int, default=1000, help="CUIs per cohort term (the limit is 1,000)")
    parser.add_argument("--rss-seconds", type=float, default=100.0, help="time bound of the 100 search_docs")
    parser.add_argument("--instances", type=int, default=200, help="512x512 CT instances of the download series")
    parser.add_argument("--download-seconds", type=float, default=40.0, help="how long a throttled download takes")
    arguments = parser.parse_args()
    selected = [name.strip() for name in arguments.only.split(",") if name.strip()]
    unknown = [name for name in selected if name not in SCENARIOS]
    if unknown or not selected:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")

    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="gateway-trust-"))
    rows, server = [], None
    try:
        with throwaway_store(arguments.store, workdir) as (database_url, storage_dir):
            checkout = Checkout(arguments.checkout, database_url, storage_dir)
            progress(f"checkout {checkout.path}, store {arguments.store}, work folder {workdir}")
            corpus = seed(checkout, workdir, arguments, needs_corpus=bool(CORPUS_SCENARIOS & set(selected)))
            context = Context(arguments, checkout, workdir, corpus)
            for name in selected:
                progress(f"scenario {name}: starting gateway serve")
                server = Server(checkout, workdir / f"serve-{name}.log").start()
                workers = server.workers()
                progress(f"  serving on 127.0.0.1:{server.port}, gateway from {server.imported_from}, "
                         f"{len(workers)} worker process(es)")
                try:
                    rows.extend(SCENARIO_FUNCTIONS[name](context, server))
                except Exception as error:
                    progress(f"  scenario {name} failed: {error!r}\n{server.log_tail()}")
                    rows.append((f"{name}: FAILED", type(error).__name__, str(error)[:200]))
                finally:
                    server.stop()
                    server = None
            if context.simple_waits:
                where, longest = max(context.simple_waits, key=lambda item: item[1])
                rows.append(("service stall: longest wait of any simple request", f"{longest:.2f} s", where))
    except KeyboardInterrupt:
        progress("interrupted: stopping the server and removing the store")
        raise SystemExit(130)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if rows:
            print_table(f"trust.py: checkout {Path(arguments.checkout).resolve()}, store {arguments.store}, "
                        f"{os.cpu_count()} CPUs, client cap {arguments.cap:.0f} s", rows)


if __name__ == "__main__":
    main()
