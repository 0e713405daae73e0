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


def test_configs_prompts_and_notebooks_ship_inside_the_package():
    from fnmatch import fnmatch

    from wandistiller.data import DEFAULT_PROMPTS_PATH, packaged_file

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [f"assets/{folder}/{path.name}" for folder, pattern in
               (("config", "*.json"), ("data", "*.txt"), ("notebooks", "*.ipynb"))
               for path in sorted((ROOT / folder).glob(pattern))]
    toy_world = sorted(p for p in (ROOT / "data" / "toy_world").rglob("*") if p.is_file())  # the toy-world teacher
    assert len(toy_world) >= 10
    shipped += [f"assets/{p.relative_to(ROOT).as_posix()}" for p in toy_world]
    assert len(shipped) >= 18
    for name in shipped:
        assert any(fnmatch(name, pattern) for pattern in package_data["wandistiller"]), f"{name} is not package data"
        # found through importlib.resources, and it is the repository's own file (not a copy that could drift)
        assert packaged_file(*name.split("/")[1:]).samefile(ROOT / name.split("/", 1)[1])
    assert DEFAULT_PROMPTS_PATH.samefile(ROOT / "data" / "static_prompts.txt")


def test_defaults_are_package_data_not_paths_next_to_the_source():
    from wandistiller.data import packaged_file
    from wandistiller.loops import DEFAULT_STUDENT_CONFIG, DistillConfig

    assert Path(DEFAULT_STUDENT_CONFIG) == packaged_file("config", "student_config_small.json")
    assert Path(DistillConfig().student_config).samefile(ROOT / "config" / "student_config_small.json")
    for source in sorted((ROOT / "wandistiller").glob("*.py")):  # a non-editable install has no repository around it
        assert "__file__" not in source.read_text(), f"{source.name}: find shipped files with data.packaged_file"
