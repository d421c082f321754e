"""What a site installs: every third-party import is declared where the code that imports it is installed
from, every declaration is bounded above, and constraints.txt (what `make test` and CI install) pins each
declared distribution inside its bound.

The source is read with ast, not imported, so code that is not installed here (the benchmarks) is checked too.
"""
import ast
import configparser
import os
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"gateway", "tests"}
UPPER_BOUNDS = {"~=", "<", "<=", "=="}


def setup_cfg():
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg")
    return config


def requirements(lines):
    return [Requirement(line) for line in lines.splitlines() if line.strip()]


def install_requires():
    return requirements(setup_cfg()["options"]["install_requires"])


def extra(name):
    return requirements(setup_cfg()["options.extras_require"][name])


def build_requires():
    with open(ROOT / "pyproject.toml", "rb") as pyproject:
        return [Requirement(line) for line in tomllib.load(pyproject)["build-system"]["requires"]]


def third_party_modules(paths):
    """{top-level module: files importing it} for the imports in `paths` of neither the standard library,
    the project, nor a module beside the importing file (bench/cohort.py's `stores`)."""
    modules = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in (name.partition(".")[0] for name in names):
                beside = (path.parent / f"{top}.py").exists() or (path.parent / top / "__init__.py").exists()
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and not beside:
                    modules.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    return modules


def undeclared_imports(paths, declared):
    """The imports in `paths` that no distribution in `declared` provides, each with its importers.

    A module not installed here (a benchmark's, when only .[test] is) is taken to come from its namesake."""
    provided_by = packages_distributions()
    allowed = {canonicalize_name(requirement.name) for requirement in declared}
    return {
        module: sorted(importers)
        for module, importers in third_party_modules(paths).items()
        if not allowed & {canonicalize_name(name) for name in provided_by.get(module, [module])}
    }


# Each part of the code and the extra it is installed with, beside the package's own requirements.
CODE = {"gateway": None, "tests": "test", "bench": "bench"}


def code_files(code):
    files = sorted((ROOT / code).rglob("*.py"))
    if code == "gateway":  # and the files beside it that gunicorn and a WSGI server load
        files += sorted(ROOT.glob("*.py"))
    return files


@pytest.mark.parametrize("code", CODE)
def test_every_third_party_import_is_declared_where_that_code_is_installed_from(code):
    declared = install_requires() + (extra(CODE[code]) if CODE[code] else [])
    assert code_files(code), f"no Python files in {code}/"
    assert undeclared_imports(code_files(code), declared) == {}


def test_the_check_sees_an_undeclared_import(tmp_path):
    (tmp_path / "stores.py").write_text("import os\n")
    script = tmp_path / "script.py"
    script.write_text("import werkzeug.exceptions\nfrom multipart import parse\nimport stores\nfrom . import x\n")
    assert undeclared_imports([script], [Requirement("multipart~=2.0")]).keys() == {"werkzeug"}


def all_declared():
    return [*install_requires(), *extra("test"), *extra("bench"), *build_requires()]


@pytest.mark.parametrize("requirement", all_declared(), ids=str)
def test_every_declared_distribution_has_an_upper_bound(requirement):
    assert {spec.operator for spec in requirement.specifier} & UPPER_BOUNDS, \
        f"{requirement}: bound it by the next major release, e.g. {requirement.name}~=X.Y"


def constraint_pins():
    """{canonical name: pinned version} of constraints.txt, whose every line is `name==version` or a comment."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pin = Requirement(line)
        (spec,) = pin.specifier
        assert spec.operator == "==" and not pin.extras and pin.marker is None, line
        name = canonicalize_name(pin.name)
        assert name not in pins, f"{pin.name} pinned twice"
        pins[name] = Version(spec.version)
    return pins


def test_constraints_pin_every_declared_distribution_inside_its_bound():
    """And pip, which the Makefile installs from constraints.txt before the rest."""
    pins = constraint_pins()
    outside = {
        str(requirement): str(pins.get(canonicalize_name(requirement.name), "not pinned"))
        for requirement in [*all_declared(), Requirement("pip")]
        if canonicalize_name(requirement.name) not in pins
        or not requirement.specifier.contains(pins[canonicalize_name(requirement.name)], prereleases=True)
    }
    assert outside == {}, "run `make constraints` after changing a bound in setup.cfg or pyproject.toml"
