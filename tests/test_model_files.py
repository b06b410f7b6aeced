"""edgeforge.models.files.check_safetensors: the safetensors library's own header validation, one line on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeforge.errors import ModelError
from edgeforge.models.files import check_safetensors


def test_microscaling_dtypes_are_accepted(tmp_path: Path) -> None:
    """F8_E8M0 scales and packed F4 weights (MX formats) are valid safetensors: accepted, and they load."""
    path = tmp_path / "mx.safetensors"
    save_file({"w": torch.randn(3), "scale": torch.ones(4, 8).to(torch.float8_e8m0fnu),
               "packed": torch.zeros(4, 8, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, str(path))
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert {header["scale"]["dtype"], header["packed"]["dtype"]} == {"F8_E8M0", "F4"}
    check_safetensors(path)
    assert load_file(str(path))["packed"].dtype == torch.float4_e2m1fn_x2


@pytest.mark.parametrize(("damage", "words"), [
    (lambda raw: raw[:5], "shorter than the 8-byte header length"),
    (lambda raw: raw[:20], "runs past the end of the file"),
    (lambda raw: raw[: len(raw) // 2], "the bytes that follow it differ in length"),
    (lambda raw: raw + b"\0" * 8, "the bytes that follow it differ in length"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "its header is not JSON describing tensors"),
])
def test_a_damaged_file_is_one_line_naming_it(tmp_path: Path, damage: object, words: str) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(ModelError) as refused:
        check_safetensors(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: corrupt or truncated safetensors file (") and words in message
    assert "\n" not in message and message.endswith("re-save or re-download the weights")
