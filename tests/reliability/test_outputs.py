"""Nothing the user owns is lost through ``--out`` (issue #19): edgeforge.outputs' rule, and every command on it.

A hostile ``--out`` is a directory (or file) holding the user's own files. Every file under the test's root is hashed
before and after: a refused command leaves the tree exactly as it was (no byte changed, nothing added), and a
command that succeeds never touches a user's file beside ``--out`` either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from edgeforge.errors import BadInputError
from edgeforge.export.gguf import load_record, read_lineage, record_path, sha256_file
from edgeforge.outputs import OUTPUT_KINDS, OutputKind, claim_output, publish, register_kind

from .helpers import assert_one_error_line, invoke


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file -> its sha256, a directory -> "dir"."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def user_dir(path: Path) -> Path:
    """A directory of the user's own: notes, a binary file, a hidden file, a subdirectory."""
    (path / "photos").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes, not edgeforge's\n")
    (path / ".config").write_text("keep=me\n")
    (path / "photos" / "cat.bin").write_bytes(os.urandom(4096))
    return path


# ---------------------------------------------------------------- the rule (edgeforge.outputs)
def _own_outputs(root: Path) -> dict[str, Path]:
    """One earlier output of each kind, marked as the command marks it (names taken from the writing modules)."""
    from edgeforge.distill.config import STATE_FILE
    from edgeforge.paths import device_bench_package
    from edgeforge.plan.detect import detect_profile, profile_to_yaml
    from edgeforge.ship.folder import MANIFEST_NAME

    made = {kind: root / kind for kind in ("onnx", "distill", "finetune", "build")}
    for d in made.values():
        d.mkdir()
    (made["onnx"] / "edgeforge-export.json").write_text("{}")
    (made["distill"] / STATE_FILE).write_text("{}")  # an interrupted distillation: --resume continues it
    (made["finetune"] / "finetune.json").write_text("{}")
    (made["build"] / "ship").mkdir()
    (made["build"] / "ship" / MANIFEST_NAME).write_text("{}")
    made["gguf"] = root / "m.gguf"
    made["gguf"].write_bytes(b"GGUF")
    record_path(made["gguf"]).write_text("{}")
    made["profile"] = root / "me.yaml"
    made["profile"].write_text(profile_to_yaml(detect_profile("me", bandwidth_size_bytes=4 << 20)))
    made["bench"] = root / "m.gguf.bench-here.json"
    # device_bench's own SCHEMA_VERSION (its distribution folder shadows the package when run from a clone)
    schema = re.search(r'SCHEMA_VERSION = "([^"]+)"', (device_bench_package() / "__init__.py").read_text())
    assert schema is not None
    made["bench"].write_text(json.dumps({"schema_version": schema[1]}))
    return made


def test_each_kind_replaces_its_own_output_and_refuses_the_others(tmp_path: Path) -> None:
    made = _own_outputs(tmp_path)
    assert set(made) == set(OUTPUT_KINDS)
    for kind, path in made.items():
        claim_output(path, kind=kind)  # its own: allowed
        for other in set(made) - {kind}:
            if OUTPUT_KINDS[other].is_dir == OUTPUT_KINDS[kind].is_dir:
                with pytest.raises(BadInputError, match=f"found {OUTPUT_KINDS[kind].what};.*--force"):
                    claim_output(path, kind=other)
                claim_output(path, kind=other, force=True)


def test_new_paths_and_empty_directories_are_allowed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for kind in OUTPUT_KINDS:
        claim_output(tmp_path / "new" / "deeper", kind=kind)
    for kind in ("onnx", "distill", "finetune", "build"):
        claim_output(tmp_path / "empty", kind=kind)


def test_a_user_directory_is_refused_naming_what_is_there(tmp_path: Path) -> None:
    mine = user_dir(tmp_path / "mine")
    with pytest.raises(BadInputError) as err:
        claim_output(mine, kind="onnx")
    message = str(err.value)
    assert "\n" not in message
    for fragment in ("--out", "expected a new path or an ONNX export", "did not write", ".config, notes.txt, "
                     "photos/", "--force"):
        assert fragment in message, message
    claim_output(mine, kind="onnx", force=True)


def test_a_directory_where_a_file_goes_is_refused_even_with_force(tmp_path: Path) -> None:
    mine = user_dir(tmp_path / "x.gguf")
    for force in (False, True):
        with pytest.raises(BadInputError, match=r"expected a file path for a GGUF export, found a directory"):
            claim_output(mine, kind="gguf", force=force)


def test_force_never_deletes_the_working_directory_or_a_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    work = user_dir(tmp_path / "project")
    monkeypatch.chdir(work / "photos")
    for out in (work / "photos", work, Path(".")):
        with pytest.raises(BadInputError, match="current directory or home"):
            claim_output(out, kind="onnx", force=True)


def test_a_kind_registered_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_kind(OutputKind("onnx", "another ONNX", True, lambda _p: False))


@pytest.mark.parametrize(("old", "new"), [("dir", "dir"), ("file", "file"), ("file", "dir"), ("dir", "file")])
def test_publish_replaces_and_leaves_nothing_beside(tmp_path: Path, old: str, new: str) -> None:
    out, staged = tmp_path / "out", tmp_path / ".out.staged"
    for path, kind, text in ((out, old, "old"), (staged, new, "new")):
        if kind == "dir":
            path.mkdir()
            (path / "f").write_text(text)
        else:
            path.write_text(text)
    publish(staged, out)
    assert (out / "f" if new == "dir" else out).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- export onnx
def test_export_onnx_refuses_a_user_directory_and_keeps_every_byte(tiny: Path, tmp_path: Path) -> None:
    mine = user_dir(tmp_path / "root" / "mine")
    before = tree(tmp_path / "root")
    line = assert_one_error_line(invoke("export", "onnx", tiny, "--out", mine, "--quantize", "none", "--no-verify"),
                                 [str(mine), "notes.txt", "--force"])
    assert "did not write" in line
    assert tree(tmp_path / "root") == before


def test_export_onnx_replaces_its_own_export_and_never_touches_neighbours(tiny: Path, tmp_path: Path) -> None:
    """An earlier export is replaced; the user's ``out.old`` beside it (once deleted as the export's aside name)
    keeps every byte, and a user's ``out.partial`` (once deleted as a stale staging directory) is refused."""
    root = tmp_path / "root"
    out = root / "out"
    out.mkdir(parents=True)
    (out / "edgeforge-export.json").write_text("{}")  # what an earlier export leaves
    (out / "model.onnx").write_text("the old graph")
    user_dir(root / "out.old")
    neighbours = {k: v for k, v in tree(root).items() if k.startswith("out.old")}
    done = invoke("export", "onnx", tiny, "--out", out, "--quantize", "none", "--no-verify", "--json")
    assert done.exit_code == 0, done.stderr[-2000:]
    assert json.loads((out / "edgeforge-export.json").read_text())["quantize"] == "none"
    assert {k: v for k, v in tree(root).items() if k.startswith("out.old")} == neighbours
    assert sorted(p.name for p in root.iterdir()) == ["out", "out.old"]

    user_dir(root / "out.partial")
    before = tree(root)
    assert_one_error_line(invoke("export", "onnx", tiny, "--out", out, "--quantize", "none", "--no-verify"),
                          [str(root / "out.partial"), "notes.txt", "move it away"])
    assert tree(root) == before


def test_export_onnx_force_replaces_a_user_directory(tiny: Path, tmp_path: Path) -> None:
    mine = user_dir(tmp_path / "mine")
    done = invoke("export", "onnx", tiny, "--out", mine, "--quantize", "none", "--no-verify", "--force")
    assert done.exit_code == 0, done.stderr[-2000:]
    assert not (mine / "notes.txt").exists() and (mine / "edgeforge-export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# ---------------------------------------------------------------- export gguf
def test_export_gguf_refuses_a_user_file_or_directory(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    user_dir(root / "x.gguf")
    (root / "mine.gguf").write_bytes(b"GGUF my own model, no record beside it")
    before = tree(root)
    for out, fragments in ((root / "mine.gguf", ["a file edgeforge did not write", "--force"]),
                           (root / "x.gguf", ["found a directory", "x.gguf/model.gguf"])):
        for extra in ([], ["--force"]) if out.is_dir() else ([],):
            assert_one_error_line(invoke("export", "gguf", tiny, "--quant", "F16", "--no-verify", "--out", out,
                                         *extra), [str(out), *fragments])
    assert tree(root) == before


def test_export_gguf_force_replaces_a_user_file(tiny_f16: Path, tmp_path: Path) -> None:
    """From the tiny model's GGUF (re-quantized in-process, no converter run). Replacing its own earlier file
    without --force: ``test_each_kind_replaces_its_own_output_and_refuses_the_others`` and the --quant auto rerun of
    ``T/test_export_gguf.py::test_quant_auto_picks_the_smallest_type_within_the_kl_budget``."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"my own bytes")
    done = invoke("export", "gguf", tiny_f16, "--quant", "Q8_0", "--no-verify", "--out", out, "--force")
    assert done.exit_code == 0, done.stderr[-2000:]
    assert load_record(out)["sha256"] == sha256_file(out) and read_lineage(out)["quant"] == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.edgeforge.json"]


def _q8_only_profile(tmp_path: Path) -> Path:
    from edgeforge.plan.profiles import BUILTIN_PROFILES_DIR

    text = (BUILTIN_PROFILES_DIR / "raspberry-pi-5-8gb.yaml").read_text(encoding="utf-8")
    text = text.replace("name: raspberry-pi-5-8gb", "name: q8-only").replace(
        "gguf: [Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0]", "gguf: [Q8_0]")
    assert "gguf: [Q8_0]" in text
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "q8-only.yaml").write_text(text, encoding="utf-8")
    return tmp_path / "profiles"


def test_quant_auto_without_a_type_under_max_kl_is_a_failed_gate_and_keeps_neighbours(tiny: Path,
                                                                                      tmp_path: Path) -> None:
    """Exit 1 (a quality gate), not 2; the candidates are measured in a fresh directory, so the user's file that has
    the name a candidate once had (``.m.auto-Q8_0.gguf``) keeps every byte."""
    root = tmp_path / "root"
    root.mkdir()
    (root / ".m.auto-Q8_0.gguf").write_bytes(os.urandom(1024))
    before = tree(root)
    done = invoke("export", "gguf", tiny, "--quant", "auto", "--max-kl", "0", "--profile", "q8-only",
                  "--profiles-dir", _q8_only_profile(tmp_path), "--out", root / "m.gguf")
    assert_one_error_line(done, ["no candidate type keeps mean KL <= 0.0", "Q8_0", "raise --max-kl"], exit_code=1,
                          progress_ok=True)  # the F16 conversion reports progress before the gate fails
    assert tree(root) == before


# ---------------------------------------------------------------- profiles detect
def test_profiles_detect_refuses_a_user_file_and_replaces_its_own(tmp_path: Path) -> None:
    mine = tmp_path / "me.yaml"
    mine.write_text("# my own notes\nname: mine\n")
    before = tree(tmp_path)
    assert_one_error_line(invoke("profiles", "detect", "--out", mine), [str(mine), "did not write", "--force"])
    assert tree(tmp_path) == before
    for extra in (["--force"], []):  # forced over the user's file, then over its own earlier output
        done = invoke("profiles", "detect", "--name", "here", "--out", mine, *extra)
        assert done.exit_code == 0, done.stderr
        assert "written by 'edgeforge profiles detect'" in mine.read_text().splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["me.yaml"]


# ---------------------------------------------------------------- distill, finetune, build (wired by the lead)
def _refused_keeping_every_byte(args: list[object], root: Path, mine: Path) -> None:
    before = tree(root)
    assert_one_error_line(invoke(*args), [str(mine), "notes.txt", "--force"], progress_ok=True)
    assert tree(root) == before


def test_distill_refuses_a_user_directory(tiny: Path, text_data: Path, tmp_path: Path) -> None:
    mine = user_dir(tmp_path / "root" / "mine")
    _refused_keeping_every_byte(["distill", "--teacher", tiny, "--student-layers", "1", "--data", text_data,
                                 "--steps", "1", "--seq-len", "16", "--eval-sequences", "1", "--eval-seq-len", "16",
                                 "--out", mine], tmp_path / "root", mine)


def test_finetune_refuses_a_user_directory(tiny: Path, task_jsonl: Path, tmp_path: Path) -> None:
    mine = user_dir(tmp_path / "root" / "mine")
    _refused_keeping_every_byte(["finetune", tiny, "--data", task_jsonl, "--steps", "1", "--out", mine],
                                tmp_path / "root", mine)


def test_build_refuses_a_user_directory(tiny: Path, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("task: null\ndistill: {enabled: false}\nfinetune: {enabled: false}\nbench: {enabled: false}\n"
                        "export: {formats: [gguf], gguf_quant: Q8_0}\nverify: {tokens: 64}\n")
    mine = user_dir(tmp_path / "root" / "mine")
    _refused_keeping_every_byte(["build", "--config", pipeline, "--teacher", tiny, "--profile", "raspberry-pi-5-8gb",
                                 "--out", mine], tmp_path / "root", mine)


def test_distill_with_force_replaces_the_directory_without_mixing(tiny: Path, text_data: Path, tmp_path: Path) -> None:
    """--force deletes what was there first: the new student never sits among the user's files."""
    mine = user_dir(tmp_path / "mine")
    r = invoke("distill", "--teacher", tiny, "--student-layers", "1", "--data", text_data, "--steps", "1",
               "--seq-len", "16", "--eval-sequences", "1", "--eval-seq-len", "16", "--out", mine, "--force")
    assert r.exit_code == 0, r.stderr
    names = {p.name for p in mine.iterdir()}
    assert "distill.json" in names and not names & {"notes.txt", ".config", "photos"}, names
