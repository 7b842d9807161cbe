"""The project stands on its own: CI runs the README's commands in a new venv; nothing names this machine."""

import os
import re
import subprocess

import pytest
from conftest import DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_ci_builds_a_fresh_venv_and_runs_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) >= 2, "README.md opens with two bash commands: the demo, then the tests"
    test_command = commands[1].strip()
    assert "pytest" in test_command and 'pip install -e ".[test]"' in test_command
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert test_command in ci.splitlines()
    assert "-m venv" in ci and ci.index("-m venv") < ci.index(test_command)
    assert "activate" in ci


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")  # an sdist: the checks below are for the repository
    return [f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def test_nothing_names_a_folder_of_one_machine():
    machine_path = re.compile(r"/work/|\.\./shared/|/root/|/home/[a-z]")
    offenders = []
    for name in _tracked_files():
        if name.startswith("data/") or name == "tests/test_project.py":
            continue
        try:
            text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue
        offenders += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if machine_path.search(line)]
    assert not offenders, f"absolute paths of a machine: {offenders[:10]}"


def test_shipped_data_sets_have_source_and_license():
    for folder in ("squad_v2_5articles", "squad_v1_dev_22articles"):
        readme = open(os.path.join(DATA_DIR, folder, "README.md"), encoding="utf-8").read()
        assert "CC BY-SA 4.0" in readme and "SQuAD" in readme
    overview = open(os.path.join(DATA_DIR, "README.md"), encoding="utf-8").read()
    assert "license" in overview.lower() and "squad_v2_5articles" in overview
