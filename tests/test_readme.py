"""The README's examples run as printed against the demo data, served by gunicorn."""
import re
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
DEMO_ADDRESS = "http://127.0.0.1:8080"


def code_blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.DOTALL | re.MULTILINE)


def examples(language):
    """The blocks that talk to the demo server (through the variable GW), as one script: later blocks use
    earlier variables."""
    return "".join(block for block in code_blocks(language) if "GW" in block)


def annotation_examples(language):
    """The blocks that talk to the annotation API (through the variable API), as one script."""
    return "".join(block for block in code_blocks(language) if re.search(r"^API ?=", block, flags=re.MULTILINE))


def serve_demo(app, gunicorn, extra_env=None):
    result = app.test_cli_runner().invoke(args=["demo"])
    assert result.exit_code == 0, result.output
    base_url, _log = gunicorn(app, extra_env)
    return base_url


@pytest.fixture
def demo_server(app, gunicorn):
    return serve_demo(app, gunicorn)


@pytest.fixture
def passphrase_demo_server(app, gunicorn):
    """The demo with the annotation API passphrase whose digest the README's examples send."""
    return serve_demo(app, gunicorn, {"GATEWAY_PASSPHRASE": "the passphrase"})


def run(command, cwd):
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr + completed.stdout
    return completed.stdout


def test_the_readme_has_examples_of_every_v1_call():
    shell, python = examples("sh"), examples("python")
    calls = re.findall(r'@bp\.(?:get|post|route)\("([^"]+)"', (PROJECT_ROOT / "gateway/v1/__init__.py").read_text())
    assert len(calls) >= 10
    for call in calls:
        assert call in shell, f"no curl example of {call}"
        assert call.lstrip("/") in python, f"no requests example of {call}"


def test_the_shell_examples_work_against_the_demo(demo_server, tmp_path):
    script = examples("sh").replace(DEMO_ADDRESS, demo_server).replace(".venv/bin/python", sys.executable)
    output = run(["bash", "-euo", "pipefail", "-c", script], tmp_path)
    assert "error_type" not in output, output
    assert output.count('{"status":"Ok"}') == 3


def test_the_python_examples_work_against_the_demo(demo_server, tmp_path):
    output = run([sys.executable, "-c", examples("python").replace(DEMO_ADDRESS, demo_server)], tmp_path)
    assert "error_type" not in output, output
    assert output.count("{'status': 'Ok'}") == 3


def test_the_readme_has_examples_of_every_annotation_call():
    shell, python = annotation_examples("sh"), annotation_examples("python")
    calls = re.findall(r'@_call\("/(\w+)', (PROJECT_ROOT / "gateway/annotations/api.py").read_text())
    assert len(calls) >= 10
    for call in calls:
        assert f"$API/{call}/" in shell, f"no curl example of {call}"
    assert "/search_anns/" in python and "/doc_detail/" in python


def test_the_annotation_shell_examples_work_against_the_demo(passphrase_demo_server, tmp_path):
    script = annotation_examples("sh").replace(DEMO_ADDRESS, passphrase_demo_server)
    output = run(["bash", "-euo", "pipefail", "-c", script.replace(".venv/bin/python", sys.executable)], tmp_path)
    assert output.startswith("truetrue"), output[:300]  # a passphrase is needed, and the README's digest is right
    assert '"success": false' not in output and '"num_results": 0' not in output, output
    assert '"mapping_name": "chest findings"' in output and "showResults({" in output


def test_the_annotation_python_example_works_against_the_demo(passphrase_demo_server, tmp_path):
    script = annotation_examples("python").replace(DEMO_ADDRESS, passphrase_demo_server)
    output = run([sys.executable, "-c", script], tmp_path)
    assert re.match(r"[1-9]\d* documents, transaction [0-9a-f-]{36} \[\]\n", output), output
