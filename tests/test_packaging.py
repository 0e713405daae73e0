import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _torch_pin():
    return re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def test_environment_yml_installs_what_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [d for d in project["dependencies"] if not d.startswith("torch")]
    declared += project["optional-dependencies"]["dev"]
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_section = [line.strip()[2:] for line in lines[lines.index("  - pip:") + 1:] if line.strip().startswith("- ")]
    assert pip_section[0] == _torch_pin()
    assert sorted(pip_section[1:]) == sorted(declared)


def test_torch_pin_is_admitted_by_the_package_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(d for d in project["dependencies"] if d.startswith("torch"))
    pinned = _torch_pin().split("==")[1]
    assert f"<={pinned}" in torch_req, "an open torch range would pull a multi-GB CUDA build on a fresh machine"


def test_console_script_help():
    for args in (["--help"], ["make-tiny-teacher", "--help"]):
        out = subprocess.run([sys.executable, "-m", "wandistiller", *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "usage: wandistiller" in out.stdout


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
