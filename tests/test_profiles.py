"""Device profiles: the built-ins validate and cite sources; broken files fail naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgeforge.errors import ProfileError
from edgeforge.plan.profiles import BUILTIN_PROFILES_DIR, load_profile_file, load_registry

REQUIRED = [
    "raspberry-pi-zero-2w", "raspberry-pi-4-4gb", "raspberry-pi-5-4gb", "raspberry-pi-5-8gb", "raspberry-pi-5-16gb",
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "phone-snapdragon-8-gen-3",
    "phone-snapdragon-8-elite", "iphone-15-pro", "phone-midrange-android", "rtx-3060-12gb", "rtx-4060-8gb",
    "rtx-4090-24gb", "apple-m2-8gb", "laptop-x86-ryzen-7840u",
]


def test_all_required_builtins_exist_and_cite_sources():
    reg = load_registry()
    assert set(REQUIRED) <= set(reg.names())
    for p in reg:
        assert p.sources, p.name
        assert p.runtime_for("gguf") and p.runtime_for("onnx"), f"{p.name} must run both formats"
        assert p.memory_budget_bytes <= p.memory_total_bytes


def test_each_file_opens_with_a_comment_naming_its_command():
    for f in BUILTIN_PROFILES_DIR.glob("*.yaml"):
        first = f.read_text().splitlines()[0]
        assert first.startswith("#") and "edgeforge" in first, f


def _pi5() -> dict:
    return yaml.safe_load((BUILTIN_PROFILES_DIR / "raspberry-pi-5-8gb.yaml").read_text())


def test_unknown_key_is_rejected_naming_file_and_field(tmp_path: Path):
    data = _pi5() | {"bogus_field": 1}
    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=r"x\.yaml.*unknown field 'bogus_field'"):
        load_profile_file(f)


def test_wrong_type_names_the_field_and_what_was_found(tmp_path: Path):
    data = _pi5() | {"memory_total_bytes": "lots"}
    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=r"field 'memory_total_bytes'.*found 'lots'"):
        load_profile_file(f)


def test_budget_above_total_is_rejected(tmp_path: Path):
    data = _pi5() | {"memory_budget_bytes": 10**12}
    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match="exceeds memory_total_bytes"):
        load_profile_file(f)


def test_not_yaml_and_not_a_mapping(tmp_path: Path):
    f = tmp_path / "x.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile_file(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(ProfileError, match="expected a YAML mapping"):
        load_profile_file(f)


def test_user_profiles_are_added_and_duplicates_rejected(tmp_path: Path):
    mine = _pi5() | {"name": "my-board"}
    (tmp_path / "my-board.yaml").write_text(yaml.safe_dump(mine))
    reg = load_registry([tmp_path])
    assert "my-board" in reg.names()
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump(_pi5()))
    with pytest.raises(ProfileError, match="already defined"):
        load_registry([tmp_path])


def test_unknown_name_lists_close_names():
    with pytest.raises(ProfileError, match="raspberry-pi-5-8gb"):
        load_registry().get("raspbery-pi-5-8gb")
