"""Schemathesis holds `gateway serve` to the OpenAPI descriptions it serves, on SQLite and on PostgreSQL.

Its command line runs here as a person runs it (docs/testing.md), with the settings of schemathesis.toml
(a fixed seed and number of examples), against the demo of `make serve`: every phase (the descriptions'
examples, coverage, fuzzing, and the stateful chains that the descriptions' links make: upload, then get,
list, download and delete what was stored). No answer may be a 5xx, and every answer must have a status,
a media type, headers and a body that the description documents.
"""
import collections
import json
import subprocess

import pytest

from tests.conftest import PROJECT_ROOT, VENV_BIN, clean_environment

# Well above what a run takes (under a minute per store for both descriptions), below the test's timeout:
# a run that overstays is stopped with what it printed so far.
RUN_SECONDS = 240
# The fuzzer signs in wrongly on purpose (does a call ignore wrong credentials?): with the throttle's
# limit, every later call of the run would be a 429.
SERVER_SETTINGS = (("GATEWAY_AUTH_FAILURE_LIMIT", "1000000"),)
# At least this share of the answers must be a success, or the run tested little but the error paths.
LEAST_SUCCESSES = 0.05


@pytest.mark.timeout(RUN_SECONDS + 30)
@pytest.mark.parametrize("description", ["v1", "annotations"])
def test_the_gateway_answers_as_its_description_says(demo, description, tmp_path):
    exchanges = tmp_path / "exchanges.har"
    command = [VENV_BIN / "schemathesis", "run", "--no-color", "--report", "har", "--report-har-path", exchanges,
               f"{demo.server(SERVER_SETTINGS)}/openapi/{description}.json"]
    try:
        # Hypothesis keeps its caches in the test's folder, not the checkout's
        env = {**clean_environment(), "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")}
        run = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=RUN_SECONDS)
    except subprocess.TimeoutExpired as stopped:
        pytest.fail(f"schemathesis ran longer than {RUN_SECONDS} s:\n{stopped.stdout}{stopped.stderr}", pytrace=False)
    if run.returncode != 0:  # its report, with a curl command that reproduces each failure
        pytest.fail(run.stdout + run.stderr, pytrace=False)
    statuses = collections.Counter(
        entry["response"]["status"] for entry in json.loads(exchanges.read_text())["log"]["entries"])
    total = sum(statuses.values())
    print(f"{description} on {demo.kind}: {total} requests, by status {sorted(statuses.items())}")  # `pytest -rP`
    successes = sum(count for status, count in statuses.items() if 200 <= status < 300)
    assert successes >= LEAST_SUCCESSES * total, f"{successes} of {total} answers were a success: {statuses}"
