"""The wheel: pyproject.toml lists every package of the tree, and the built wheel installs and runs on its own.

The fast tests read pyproject.toml against the tree, so a new subpackage or data file cannot be forgotten. The
integration test builds the wheel, installs it (not editable) into a fresh virtualenv that borrows the project's
installed dependencies, and runs the CLI from a folder outside the repository, as a user of the wheel would.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
#: Folders of the repository that are never part of the wheel, whatever they hold.
NOT_SHIPPED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _package_dir(package: str) -> Path:
    """Where setuptools takes ``package`` from: its package-dir mapping, or the folder its name spells."""
    mapped: dict[str, str] = SETUPTOOLS.get("package-dir", {})
    for prefix in sorted(mapped, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            return ROOT / mapped[prefix] / Path(*package[len(prefix):].split(".")[1:])
    return ROOT / Path(*package.split("."))


def _tree_packages() -> set[str]:
    """Every package of the tree: each folder under edgeforge/ with an __init__.py, and the mapped ones."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgeforge").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    mapped = {name for name in SETUPTOOLS.get("package-dir", {}) if (_package_dir(name) / "__init__.py").is_file()}
    return found | mapped


def test_the_package_list_is_the_tree() -> None:
    listed = set(SETUPTOOLS["packages"])
    tree = _tree_packages()
    assert not tree - listed, f"packages missing from pyproject.toml's [tool.setuptools] list: {sorted(tree - listed)}"
    assert not listed - tree, f"pyproject.toml lists packages the tree does not have: {sorted(listed - tree)}"
    assert len(SETUPTOOLS["packages"]) == len(listed), "a package is listed twice"


def test_no_python_folder_lacks_an_init() -> None:
    """A folder of modules without __init__.py would be a namespace package, which an explicit list leaves out."""
    bare = sorted(str(d.relative_to(ROOT)) for d in (ROOT / "edgeforge").rglob("*") if d.is_dir()
                  and d.name not in NOT_SHIPPED and any(d.glob("*.py")) and not (d / "__init__.py").is_file())
    assert not bare, f"folders of modules without __init__.py: {bare}"


def test_no_file_of_a_package_is_ignored_by_git() -> None:
    """A clone must hold every file the wheel takes (an ignore rule for build/ once hid edgeforge/build/)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    folders = sorted({str(_package_dir(p).relative_to(ROOT)) for p in SETUPTOOLS["packages"]})
    ignored = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", *folders],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    ignored = [f for f in ignored if "__pycache__" not in f and not f.endswith(".pyc")]
    assert not ignored, f"package files that .gitignore hides from a clone: {ignored}"


def test_every_data_file_of_a_package_is_shipped() -> None:
    """Each non-Python file in a package folder matches that package's package-data patterns."""
    patterns: dict[str, list[str]] = SETUPTOOLS.get("package-data", {})
    missing = []
    for package in SETUPTOOLS["packages"]:
        for f in _package_dir(package).iterdir():
            if f.is_file() and f.suffix not in (".py", ".pyc") and not any(
                    fnmatch.fnmatch(f.name, p) for p in patterns.get(package, [])):
                missing.append(f"{package}: {f.relative_to(ROOT)}")
    assert not missing, f"data files no package-data pattern ships: {missing}"


def test_a_built_in_pipeline_is_found_by_name_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeforge.build.config import load_pipeline
    from edgeforge.errors import BadInputError

    monkeypatch.chdir(tmp_path)  # no pipelines/ folder here, as for a user of the installed wheel
    assert load_pipeline(Path("finetune-then-distill")).order == "finetune-then-distill"
    assert load_pipeline(Path("finetune-then-distill.yaml")).order == "finetune-then-distill"
    with pytest.raises(BadInputError, match="one of: default, distill-then-finetune, finetune-then-distill, "
                                             "prune-then-finetune"):
        load_pipeline(Path("finetune-then-distil"))


# ---------------------------------------------------------------- the installed wheel, outside the repository
def _copy_of_the_tree(dest: Path) -> Path:
    """The working tree without what a build leaves behind (a stale build/ would leak into the wheel)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in NOT_SHIPPED}
        if Path(folder).resolve() == ROOT:
            skip |= {n for n in names if n in ("build", "dist") or n.endswith(".egg-info")}
        return skip

    return Path(shutil.copytree(ROOT, dest, ignore=ignore))


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.integration
def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    from tiny_models import make_tiny_model

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    src = _copy_of_the_tree(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
          src], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("edgeforge-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    venv_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                          env).strip())
    # The project's dependencies, borrowed as a plain path entry: .pth files there (the editable edgeforge's
    # finder among them) are not processed, so only the installed wheel provides edgeforge.
    (venv_site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path, env=env)

    outside = tmp_path / "user"
    outside.mkdir()
    where = _run([python, "-c", "import edgeforge, device_bench; print(edgeforge.__file__); "
                  "print(device_bench.__file__)"], outside, env).split()
    assert all(Path(w).is_relative_to(venv) for w in where), where
    edgeforge = venv / "bin" / "edgeforge"

    profiles = json.loads(_run([edgeforge, "profiles", "list", "--json"], outside, env))
    assert len(profiles if isinstance(profiles, list) else profiles["profiles"]) >= 14
    plan = json.loads(_run([edgeforge, "plan", "--profile", "raspberry-pi-5-8gb", "--json"], outside, env))
    assert plan
    tiny = make_tiny_model(tmp_path / "tiny")
    _run([edgeforge, "export", "gguf", tiny, "--quant", "Q8_0", "--out", outside / "t.gguf"], outside, env)
    assert (outside / "t.gguf").stat().st_size > 0
    bench = json.loads(_run([edgeforge, "bench", outside / "t.gguf", "--target", "local", "--json"], outside, env))
    assert bench
    for config in ([], ["--config", "finetune-then-distill"]):
        _run([edgeforge, "build", *config, "--profile", "raspberry-pi-zero-2w", "--out", outside / "b", "--dry-run"],
             outside, env)
