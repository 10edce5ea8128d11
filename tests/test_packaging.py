"""Packaging contracts: one version source, typed package, dependency ranges with exact tested pins
kept in constraints.txt, and README/CI installing with those pins."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import covidscan
from covidscan.cli import main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[tuple[str, Requirement]]:
    """Every requirement of the package: (extra or "", requirement), self-references left out."""
    found = [("", Requirement(text)) for text in PROJECT["dependencies"]]
    for extra, texts in PROJECT["optional-dependencies"].items():
        found += [(extra, Requirement(text)) for text in texts if not text.startswith("covidscan[")]
    return found


def test_cli_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"covidscan {covidscan.__version__}"


def test_version_is_written_once():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "covidscan.__version__"}
    source = (ROOT / "src" / "covidscan" / "__init__.py").read_text()
    assert len(re.findall(r"^__version__ = ", source, re.M)) == 1


def test_installed_metadata_agrees_with_the_source():
    try:
        installed = importlib.metadata.version("covidscan")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("covidscan is not installed (running from a source tree on PYTHONPATH)")
    assert installed == covidscan.__version__


def test_package_is_typed():
    assert (ROOT / "src" / "covidscan" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["covidscan"]


def test_dependencies_are_ranges_and_constraints_pin_a_version_inside_each():
    pins = _constraints()
    for extra, requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} ({extra or 'runtime'}) has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )
        exact = any(spec.operator in ("==", "===") for spec in requirement.specifier)
        # pinned exactly on purpose: lint tools (a new linter release must not turn CI red by itself) and
        # weights packages (data files whose names the code knows)
        assert exact == (extra in ("lint", "weights")), f"{requirement}: a range, or an exact pin for lint/weights"


def test_torch_stays_on_the_tested_cpu_build():
    pins = _constraints()
    assert pins["torch"] == "2.13.0" and pins["torchvision"] == "0.28.0"


def test_readme_commands_and_ci_install_with_the_constraints():
    readme = (ROOT / "README.md").read_text()
    installs = re.findall(r"\.venv/bin/pip install (?!--no-deps)[^&]*", readme)
    assert len(installs) >= 2, installs  # the demo command and the test command
    assert all("-c constraints.txt" in command for command in installs), installs
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci and "<!-- test-command -->" in ci
    for check in ("ruff check", "ruff format --check", "mypy"):
        assert ci.index(check) < ci.index('bash -c "$test_command"'), f"{check} must run before the tests"
