"""Every shell and Python block of README.md and docs/*.md runs on its own, as printed, against the demo that
`make serve` serves (`gateway demo`, then `gateway serve`), on SQLite and on PostgreSQL.

Each block runs in a fresh process (`bash -e -o pipefail`, or `python`) in the repository root, with the
venv's bin first on PATH, GW naming the demo server (the blocks read `GW=${GW:-http://127.0.0.1:8080}`),
GATEWAY_DATABASE_URL / GATEWAY_STORAGE_DIR naming the demo store and TMPDIR a folder of its own; it must
succeed, print no error answer and leave no new file in the repository. An HTML comment right before a
block says when it runs otherwise (several are joined by "; "):

    <!-- docs-test: skip: REASON -->        it does not run here, for REASON
    <!-- docs-test: env NAME=VALUE ... -->  against a demo server started with these settings as well
    <!-- docs-test: serves -->              it serves the demo until stopped: it is started, bound where the test
                                            says instead of 127.0.0.1:8080 (BIND for `make serve`), must answer
                                            a v1 call with the demo's data, and is stopped
    <!-- docs-test: second store -->        on a second demo store, which only such blocks use: what it makes
                                            (users, projects) can be made only once
    <!-- docs-test: shows errors -->        its output must hold an error answer
"""
import dataclasses
import io
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests

from gateway import create_app
from gateway.db import db
from gateway.demo import DEMO_CONTENT, demo_documents, demo_instances
from tests.conftest import PROJECT_ROOT, _free_port, gunicorn_servers, wait_until_serving

DOCUMENTS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
RUNNABLE = ("sh", "bash", "python")
NOT_RUN = ("text", "json", "nginx", "ini")  # sample output, answers, a site's configuration files
DEMO_ADDRESS = "127.0.0.1:8080"
# How a block names the demo server: GW, which the test sets, with the demo's address as the default.
GW_DEFAULTS = ("${GW:-http://127.0.0.1:8080}", 'os.environ.get("GW", "http://127.0.0.1:8080")')
VENV_BIN = Path(sys.executable).parent
FENCE = re.compile(r"^(\s*)```(.*)$")
DIRECTIVE = re.compile(r"^<!-- docs-test: (.*) -->$")
# The error bodies of both APIs, as JSON or as Python prints them
ERROR_ANSWER = re.compile(r"""["']error_type["']\s*:|["']success["']\s*:\s*(false|False)\b""")
# `gateway` where a shell runs it as a command (not `.venv/bin/gateway`, not a word in a comment or string)
BARE_GATEWAY = re.compile(r"(^|[|;&(]|\$\()\s*(\w+=\S*\s+)*gateway\b", re.MULTILINE)
DEMO_PATIENT = {"Project": "demo", "Archive": "main", "PatientID": "DEMO-001"}
DEMO_CREDENTIALS = {"X-USERNAME": "demo", "X-PASSWORD": "demo"}
BLOCK_SECONDS = 120


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to the repository
    line: int  # of the opening fence
    indent: str
    language: str
    text: str
    directive: str  # the docs-test comment before it, or ""

    @property
    def id(self):
        return f"{self.path}:{self.line}"


@dataclasses.dataclass(frozen=True)
class HowToRun:
    skip: str = ""
    server_env: tuple = ()
    serves: bool = False
    second_store: bool = False
    shows_errors: bool = False


def read_blocks(path):
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next((number for number in range(index + 1, len(lines)) if FENCE.match(lines[number])), len(lines))
        directive = DIRECTIVE.match(lines[index - 1]) if index else None
        blocks.append(Block(
            str(path.relative_to(PROJECT_ROOT)), index + 1, opening.group(1), opening.group(2).strip(),
            "".join(line + "\n" for line in lines[index + 1:end]), directive.group(1) if directive else "",
        ))
        index = end + 1
    return blocks


def how_to_run(directive):
    """The HowToRun of a docs-test comment; ValueError for one this test does not know."""
    how = {}
    for part in filter(None, (part.strip() for part in directive.split(";"))):
        if part.startswith("skip:") and part[5:].strip():
            how["skip"] = part[5:].strip()
        elif part.startswith("env "):
            settings = [setting.partition("=") for setting in shlex.split(part[4:])]
            if not settings or not all(name.startswith("GATEWAY_") and equals for name, equals, _ in settings):
                raise ValueError(f"docs-test env takes GATEWAY_NAME=VALUE settings, not {part!r}")
            how["server_env"] = tuple((name, value) for name, _, value in settings)
        elif part in ("serves", "second store", "shows errors"):
            how[part.replace(" ", "_")] = True
        else:
            raise ValueError(f"unknown docs-test directive {part!r}")
    return HowToRun(**how)


BLOCKS = [block for path in DOCUMENTS for block in read_blocks(path)]
RUNNABLE_BLOCKS = [block for block in BLOCKS if block.language in RUNNABLE]


# --- what the blocks are ----------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_a_block_is_written_as_this_test_reads_it(block):
    assert not block.indent, "a fence starts its line (an indented block would not be run)"
    assert block.language in RUNNABLE + NOT_RUN, (
        f"info string {block.language!r}: runnable blocks are {', '.join(RUNNABLE)}; others "
        f"{', '.join(NOT_RUN)}")
    how = how_to_run(block.directive)
    if block.language not in RUNNABLE:
        assert not block.directive, "a docs-test comment before a block that is not run"
        return
    if not (how.serves or how.skip):
        unnamed = block.text
        for default in GW_DEFAULTS:
            unnamed = unnamed.replace(default, "")
        assert DEMO_ADDRESS not in unnamed, f"name the server as {' or '.join(GW_DEFAULTS)}: the test sets GW"
    if block.language != "python":
        bare = [line for line in block.text.splitlines() if BARE_GATEWAY.search(line.split("#")[0])]
        assert not bare or ". .venv/bin/activate" in block.text, (
            f"`gateway` without saying where it comes from (.venv/bin/gateway, or `. .venv/bin/activate` first): {bare}")


def test_the_readme_is_a_front_page_and_the_docs_have_their_examples():
    assert len((PROJECT_ROOT / "README.md").read_text().splitlines()) < 100
    with_examples = {block.path for block in RUNNABLE_BLOCKS if not how_to_run(block.directive).skip}
    assert {"README.md", "docs/api.md", "docs/administration.md", "docs/configuration.md"} <= with_examples


def _calls(source, pattern):
    calls = re.findall(pattern, (PROJECT_ROOT / source).read_text())
    assert len(calls) >= 10, f"the calls of {source} are no longer found by {pattern}"
    return calls


def test_the_api_guide_has_examples_of_every_call():
    guide = [block for block in RUNNABLE_BLOCKS if block.path == "docs/api.md"]
    shell = "".join(block.text for block in guide if block.language != "python")
    python = "".join(block.text for block in guide if block.language == "python")
    for call in _calls("gateway/v1/__init__.py", r'@(?:bp\.(?:get|post)|_deleting_route)\("([^"]+)"'):
        assert f"/api/v1{call}" in shell, f"no curl example of {call}"
        assert call.strip("/") in python, f"no requests example of {call}"
    for call in _calls("gateway/annotations/api.py", r'@_call\("(/\w+)'):
        assert f"/api{call}/" in shell, f"no curl example of {call}"
    assert "/search_anns/" in python and "/doc_detail/" in python


# The SOP Class of each demo modality, as the DICOM standard names them (PS3.4 B.5)
SOP_CLASS_OF_MODALITY = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "OP": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage: the fundus photographs are 16-bit grey
}


def test_the_demo_images_and_reports_carry_the_sop_class_of_their_modality():
    sop_classes = {}
    for project_index, (_project, _kind, patients) in enumerate(DEMO_CONTENT, start=1):
        for patient_number, patient in enumerate(patients, start=1):
            for sop_uid, data in demo_instances(project_index, patient_number, patient):
                image = pydicom.dcmread(io.BytesIO(data))
                assert image.SOPClassUID == image.file_meta.MediaStorageSOPClassUID
                assert image.SOPClassUID == SOP_CLASS_OF_MODALITY[image.Modality], (sop_uid, image.Modality)
                sop_classes[sop_uid] = image.SOPClassUID
    reports = list(demo_documents())
    assert len(reports) == 40
    assert all(report.sop_class_uid == sop_classes[report.sop_instance_uid] for report in reports)


# --- running them -------------------------------------------------------------------------------------------


class Demo:
    """The demo store of one kind (sqlite | postgresql) and a second one for the blocks that make what can be
    made only once, each seeded by `gateway demo`, and the servers that `gateway serve` runs on the first, one
    per set of extra settings."""

    def __init__(self, request, kind, folder, start_server):
        self.request, self.kind, self.folder, self.start_server = request, kind, folder, start_server
        self.stores = 0
        self.env = self.new_store()
        self.app = create_app({"DATABASE_URL": self.env["GATEWAY_DATABASE_URL"],
                               "STORAGE_DIR": self.env["GATEWAY_STORAGE_DIR"]})
        self.servers = {}
        self._second_store = None

    def second_store(self):
        if self._second_store is None:
            self._second_store = self.new_store()
        return self._second_store

    def new_store(self):
        """The settings of a new store that `gateway demo` has seeded, as `make serve` seeds one."""
        self.stores += 1
        if self.kind == "sqlite":
            url = f"sqlite:///{self.folder / f'gateway-{self.stores}.sqlite'}"
        else:
            url = self.request.getfixturevalue("postgres_server").create_database()
        env = {"GATEWAY_DATABASE_URL": url, "GATEWAY_STORAGE_DIR": str(self.folder / f"storage-{self.stores}")}
        seeded = subprocess.run([VENV_BIN / "gateway", "demo"], env={**clean_environment(), **env},
                                capture_output=True, text=True, timeout=BLOCK_SECONDS)
        assert seeded.returncode == 0, seeded.stdout + seeded.stderr
        return env

    def server(self, extra_env=()):
        """The base URL of `gateway serve` on the demo store, with `extra_env` settings besides."""
        if extra_env not in self.servers:
            self.servers[extra_env], _log = self.start_server(self.app, dict(extra_env), via_cli=True)
        return self.servers[extra_env]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def demo(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"demo-{request.param}")
    with gunicorn_servers(folder) as start_server:
        demo = Demo(request, request.param, folder, start_server)
        yield demo
    with demo.app.app_context():
        db.engine.dispose()


def clean_environment():
    """This process's environment without GATEWAY_* settings, which must not change what a block does."""
    return {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}


def untracked_files():
    listed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, check=True).stdout
    return {line[3:] for line in listed.splitlines() if line.startswith("?? ")}


def report(block, completed):
    return (f"{block.id} ({block.language}) exited {completed.returncode}\n--- block\n{block.text}"
            f"--- stdout\n{completed.stdout}--- stderr\n{completed.stderr}")


def run_block(block, env):
    interpreter = [sys.executable, "-c"] if block.language == "python" else ["bash", "-e", "-o", "pipefail", "-c"]
    process = subprocess.Popen([*interpreter, block.text], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=BLOCK_SECONDS)
    except subprocess.TimeoutExpired:
        stop(process)
        stdout, stderr = process.communicate()
        stderr += f"\n(stopped after {BLOCK_SECONDS} s)"
    stop(process)  # what it left running
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert completed.returncode == 0, report(block, completed)
    return completed


def stop(process):
    """Stop a process started in a session of its own, with every process of its group (a block's server:
    make, gateway, gunicorn's workers; or what a block left running)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):  # the group has ended, or will not
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def serve_block(block, env, log_path):
    """Run a block that serves until stopped on a free port; check that it serves the demo; stop it."""
    if "make " in block.text:
        planned = subprocess.run(["make", "-n", "serve"], cwd=PROJECT_ROOT, capture_output=True, text=True)
        if "pip " in planned.stdout:  # never install into the venv that the suite runs in
            pytest.skip("the venv is older than what `make serve` installs: run `make test`, which updates it first")
    bind = f"127.0.0.1:{_free_port()}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["bash", "-e", "-c", block.text.replace(DEMO_ADDRESS, bind)], cwd=PROJECT_ROOT,
                                   env={**env, "BIND": bind}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_until_serving(process, f"http://{bind}", log_path, seconds=60)
        answer = requests.get(f"http://{bind}/api/v1/patient/get/", params=DEMO_PATIENT, headers=DEMO_CREDENTIALS,
                              timeout=10)
        assert answer.status_code == 200 and answer.json()["PatientID"] == "DEMO-001", answer.text
    finally:
        stop(process)


@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[block.id for block in RUNNABLE_BLOCKS])
def test_the_block_runs_as_printed(block, demo, tmp_path):
    how = how_to_run(block.directive)
    if how.skip:
        pytest.skip(f"{block.id}: {how.skip}")
    store = demo.second_store() if how.second_store else demo.env
    env = {
        **clean_environment(),
        **store,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "GW": demo.server(how.server_env),
        "TMPDIR": str(tmp_path),
    }
    before = untracked_files()
    if how.serves:
        serve_block(block, {**env, **dict(how.server_env)}, tmp_path / "served.log")
    else:
        completed = run_block(block, env)
        assert bool(ERROR_ANSWER.search(completed.stdout)) == how.shows_errors, (
            ("no error answer in the output of a block that shows errors\n" if how.shows_errors else
             "an error answer in the output (a block that shows one says so: <!-- docs-test: shows errors -->)\n")
            + report(block, completed))
    assert untracked_files() <= before, f"{block.id} wrote files into the repository (write them into a mktemp -d)"
