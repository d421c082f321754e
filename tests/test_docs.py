"""Every shell and Python block of README.md and docs/*.md runs on its own, as printed, against the demo that
`make serve` serves (`gateway demo`, then `gateway serve`), on its SQLite store as `make serve` makes it (what
the examples show of either store is tested on both by the API's own tests).

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
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pydicom
import pytest
import requests
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from gateway.demo import DEMO_CONTENT, demo_documents, demo_instances
from gateway.openapi import annotations as openapi_annotations, v1 as openapi_v1
from tests.conftest import PROJECT_ROOT, VENV_BIN, _free_port, clean_environment, wait_until_serving

DOCUMENTS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
RUNNABLE = ("sh", "bash", "python")
NOT_RUN = ("text", "json", "nginx", "ini")  # sample output, answers, a site's configuration files
DEMO_ADDRESS = "127.0.0.1:8080"
# How a block names the demo server: GW, which the test sets, with the demo's address as the default.
GW_DEFAULTS = ("${GW:-http://127.0.0.1:8080}", 'os.environ.get("GW", "http://127.0.0.1:8080")')
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
    for call in _calls("gateway/v1/__init__.py", r'@_call\("([^"]+)"'):
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


@pytest.mark.parametrize("demo", ["sqlite"], indirect=True)
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


# --- the examples against the OpenAPI descriptions -----------------------------------------------------------

DESCRIPTIONS = (openapi_v1.build(), openapi_annotations.build())
# jQuery's cache buster beside the vis page's j (an example shows it): every call ignores it
IGNORED_QUERY_NAMES = {"_"}
CURL_OPTIONS_WITH_VALUES = {"-H", "--header", "-F", "--form", "-d", "--data", "--data-raw", "--data-binary",
                            "--data-urlencode", "-X", "--request", "-o", "--output", "-w", "--write-out"}
SHELL_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclasses.dataclass
class ExampleRequest:
    """A request of an example, as far as a description lists it."""

    where: str
    method: str
    url: str  # from the path on
    media_type: str = None  # of its body
    fields: dict = dataclasses.field(default_factory=dict)  # of a form body: name -> value (None for a file)
    json: object = None  # a JSON body


def described_operation(method, path):
    """(description, operation) of the call a request's method and path name, or None; with method None,
    (description, None) when the path is described at all."""
    for document in DESCRIPTIONS:
        for template, item in document["paths"].items():
            pattern = "".join("[^/]+" if part.startswith("{") else re.escape(part)
                              for part in re.split(r"(\{\w+\})", template))
            if re.fullmatch(pattern, path) and (method is None or method.lower() in item):
                return document, method and item[method.lower()]
    return None


def resolved(document, schema):
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rpartition("/")[2]]
    return schema


def unknown_keys(document, value, schema, where):
    """The keys of a JSON value that its schema does not list, at any depth."""
    schema = resolved(document, schema)
    branches = schema.get("anyOf", []) + schema.get("oneOf", [])
    if branches:
        # the branch of the value's JSON type that knows most of its keys
        found = [unknown_keys(document, value, branch, where) for branch in branches
                 if _json_type_fits(value, resolved(document, branch))]
        return min(found, key=len) if found else []
    if isinstance(value, dict) and "properties" in schema:
        unknown = [f"{where}.{key}" for key in value if key not in schema["properties"]]
        for key, item in value.items():
            if key in schema["properties"]:
                unknown += unknown_keys(document, item, schema["properties"][key], f"{where}.{key}")
        return unknown
    if isinstance(value, list) and "items" in schema:
        return [key for index, item in enumerate(value)
                for key in unknown_keys(document, item, schema["items"], f"{where}[{index}]")]
    return []


def _json_type_fits(value, schema):
    """Whether a schema's type admits the value's: an object, an array or another JSON value."""
    kinds = schema.get("type")
    if kinds is None:
        return True
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    if isinstance(value, dict):
        return "object" in kinds
    if isinstance(value, list):
        return "array" in kinds
    return bool(kinds - {"object", "array"})


def undescribed(request, deliberate_errors=False):
    """What of `request` the descriptions do not list: its call, a query parameter, a form field or JSON key,
    or a required parameter it leaves out. Empty when they list all of it. An example of errors breaks its
    calls on purpose: of its requests only the path must be described."""
    split = urlsplit(request.url)
    path = unquote(split.path)
    found = described_operation(None if deliberate_errors else request.method, path)
    if found is None:
        return [f"{request.method} {path}: no such call"]
    if deliberate_errors:
        return []
    document, operation = found
    call = f"{request.method} {path}"
    problems = []
    parameters = {parameter["name"]: parameter for parameter in operation.get("parameters", [])
                  if parameter["in"] == "query"}
    keys = {scheme["name"] for scheme in document["components"].get("securitySchemes", {}).values()
            if scheme["in"] == "query"}
    query = parse_qs(split.query, keep_blank_values=True)
    for name, values in query.items():
        if name in IGNORED_QUERY_NAMES or name in keys:
            continue
        if name not in parameters:
            problems.append(f"{call}: the query parameter {name} is not described")
        elif "content" in parameters[name]:
            problems += _json_problems(document, call, name, values[0],
                                       parameters[name]["content"]["application/json"]["schema"])
    problems += [f"{call}: the required parameter {name} is missing" for name, parameter in parameters.items()
                 if parameter.get("required") and name not in query]
    if request.media_type is None:
        return problems
    content = operation.get("requestBody", {}).get("content", {})
    if request.media_type not in content:
        return problems + [f"{call}: a body of {request.media_type} is not described"]
    body = content[request.media_type]
    schema = resolved(document, body["schema"])
    if request.media_type == "application/json":
        return problems + [f"{call}: the JSON key {key} is not described"
                           for key in unknown_keys(document, request.json, schema, "body")]
    for name, value in request.fields.items():
        field = schema["properties"].get(name)
        if field is None:
            problems.append(f"{call}: the form field {name} is not described")
        elif field.get("contentMediaType") == "application/json":  # JSON text
            problems += _json_problems(document, call, name, value, field["contentSchema"])
        elif body.get("encoding", {}).get(name, {}).get("contentType") == "application/json":  # a JSON part
            problems += _json_problems(document, call, name, value, field)
    return problems + [f"{call}: the required form field {name} is missing" for name in schema.get("required", ())
                       if name not in request.fields]


def _json_problems(document, call, name, text, schema):
    try:
        value = json.loads(text)
    except ValueError:  # a value the shell fills in, such as "$1"
        return []
    return [f"{call}: the key {key} is not described" for key in unknown_keys(document, value, schema, name)]


def curl_requests(block):
    """The requests of a shell block's curl commands, its variables and arrays filled in where it sets them."""
    variables, arrays, requests_made = {"GW": "http://127.0.0.1:8080"}, {}, []
    lexer = shlex.shlex(block.text.replace("\\\n", " "), posix=True, punctuation_chars=";&|()\n")
    lexer.whitespace, lexer.whitespace_split, lexer.commenters = " \t", True, "#"
    for command in _commands(lexer):
        words = [word for token in command for word in _expanded(token, variables, arrays)]
        assignment = re.fullmatch(r"(\w+)=(.*)", words[0])
        if assignment and words[1:2] == ["("]:
            arrays[assignment.group(1)] = words[2:]
        elif assignment and len(words) == 1:
            variables[assignment.group(1)] = assignment.group(2)
        if "curl" in words:
            requests_made.append(_curl_request(block.id, words[words.index("curl") + 1:]))
    return requests_made


def _commands(lexer):
    """The words of each command (or array) of a shell text: what its lines, ;, |, && and ) separate."""
    command = []
    for token in lexer:
        if set(token) <= set(lexer.punctuation_chars) and set(token) & set(";&|)\n"):
            if command:
                yield command
            command = []
        else:
            command.append(token)
    if command:
        yield command


def _expanded(token, variables, arrays):
    array = re.fullmatch(r"\$\{(\w+)\[@\]\}", token)
    if array:
        return arrays.get(array.group(1), [])
    return [SHELL_VARIABLE.sub(lambda match: variables.get(match.group(1) or match.group(2), match.group(0)), token)]


def _curl_request(where, arguments):
    method, url, headers, data, fields, get = None, None, [], [], {}, False
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        value = arguments[index + 1] if argument in CURL_OPTIONS_WITH_VALUES and index + 1 < len(arguments) else None
        index += 2 if value is not None else 1
        if argument in ("-X", "--request"):
            method = value
        elif argument in ("-H", "--header"):
            headers.append(value.lower())
        elif argument in ("-F", "--form"):
            name, _, field = value.partition("=")
            fields[name] = None if field.startswith("@") else field
        elif argument in ("-d", "--data", "--data-raw", "--data-binary", "--data-urlencode"):
            data.append(value)
        elif argument in ("-G", "--get"):
            get = True
        elif not argument.startswith("-") and value is None and "/" in argument:
            url = argument
    method = method or ("GET" if get or not (data or fields) else "POST")
    request = ExampleRequest(where, method, url[url.index("/", url.index("//") + 2):] if "//" in url else url)
    if get:
        request.url += ("&" if "?" in request.url else "?") + "&".join(
            f"{name}={quote(value)}" for name, _, value in (item.partition("=") for item in data))
    elif fields:
        request.media_type, request.fields = "multipart/form-data", fields
    elif data and "content-type: application/json" in headers:
        request.media_type = "application/json"
        try:
            request.json = json.loads(data[0])
        except ValueError:  # a body the shell fills in
            request.media_type = None
    elif data:
        request.media_type = "application/x-www-form-urlencoded"
        request.fields = dict(item.partition("=")[::2] for item in data)
    return request


SHELL_BLOCKS = [block for block in BLOCKS if block.language in ("sh", "bash")]


def test_every_curl_example_is_a_described_call_with_described_parameters():
    made = [(request, how_to_run(block.directive).shows_errors) for block in SHELL_BLOCKS
            for request in curl_requests(block) if urlsplit(request.url).path.startswith("/api/")]
    assert len(made) > 40, "the curl commands of the docs are no longer found"
    problems = [f"{request.where}: {problem}" for request, errors in made for problem in undescribed(request, errors)]
    assert not problems, "\n".join(problems)


@contextlib.contextmanager
def sent_requests():
    """The requests that `requests` sends within the block, each recorded as it goes out."""
    sent = []
    send = requests.adapters.HTTPAdapter.send

    def record(adapter, prepared, **options):
        sent.append(prepared)
        return send(adapter, prepared, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(requests.adapters.HTTPAdapter, "send", record)
        yield sent


def example_request(where, prepared):
    """The ExampleRequest of what `requests` sent, its body read as the gateway reads it."""
    split = urlsplit(prepared.url)
    body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body or b""
    sent = Request(EnvironBuilder(path=split.path, query_string=split.query, method=prepared.method, data=body,
                                  content_type=prepared.headers.get("Content-Type")).get_environ())
    request = ExampleRequest(where, prepared.method, split.path + (f"?{split.query}" if split.query else ""))
    if body:
        request.media_type = sent.mimetype
        if sent.mimetype == "application/json":
            request.json = sent.get_json()
        else:
            request.fields = {**sent.form.to_dict(), **dict.fromkeys(sent.files)}
    return request


PYTHON_BLOCKS = [block for block in RUNNABLE_BLOCKS if block.language == "python" and not how_to_run(block.directive).skip]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[block.id for block in PYTHON_BLOCKS])
def test_every_requests_example_is_a_described_call_with_described_parameters(block, demo, monkeypatch, tmp_path):
    how = how_to_run(block.directive)
    assert not how.second_store, "a Python block on the second store: give this test its server"
    monkeypatch.setenv("GW", demo.server(how.server_env))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with sent_requests() as sent:
        exec(compile(block.text, block.id, "exec"), {"__name__": "__main__"})  # the block, as printed
    assert sent, f"{block.id} sends no request"
    problems = [problem for prepared in sent for problem in undescribed(example_request(block.id, prepared))]
    assert not problems, "\n".join(problems)
