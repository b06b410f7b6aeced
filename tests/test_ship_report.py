"""The ship folder (manifest, model card, Modelfile) and the self-contained HTML report, from a summary dict alone.

No models: the summary is what ``edgeforge build`` would hand over. One test renders the report in a real headless
Chromium, because an SVG that a browser refuses to draw still passes every string check.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from edgeforge.ship.folder import MANIFEST_SCHEMA, check_manifest, file_entries, model_card, modelfile, write_ship
from edgeforge.ship.report_html import render_report

# SmolLM2-135M-Instruct's chat template, verbatim from the bundled GGUF's tokenizer.chat_template.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _summary() -> dict:
    """A realistic build summary: distilled then fine-tuned, one GGUF and one ONNX artifact, one unmeasured speed."""
    dist_curve = [{"step": s, "tokens": 4096 * s, "loss": 2.9 / (1 + s / 40) + 0.4, "kl": 2.4 / (1 + s / 40) + 0.3,
                   "lr": 3e-4, "tokens_per_s": 900.0} for s in range(10, 310, 10)]
    ft_curve = [{"step": s, "tokens": 2048 * s, "loss": 1.8 / (1 + s / 25) + 0.1, "ce": 1.8 / (1 + s / 25) + 0.1}
                for s in range(10, 210, 10)]
    return {
        "name": "smollm2-135m-instruct-raspberry-pi-zero-2w",
        "profile": {"name": "raspberry-pi-zero-2w", "backend": "cpu", "description": "Raspberry Pi Zero 2 W, 512 MB",
                    "memory_budget_bytes": 300_000_000,
                    "latency_goals": {"ttft_ms": 3000.0, "decode_tokens_per_s": 5.0}},
        "teacher": {"name": "smollm2-135m-instruct", "params": 134_515_008, "license": "apache-2.0",
                    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "perplexity": 18.2,
                    "size_bytes": 269_060_552},
        "plan": {"decision": "both", "reason": "too slow on raspberry-pi-zero-2w (2.1 < 5 tok/s): distill into an "
                 "8-layer student, then fine-tune for the task", "quant": "Q4_K_M", "format": "gguf",
                 "backend": "cpu", "fits": True, "context_tokens": 1024, "estimated_decode_tokens_per_s": 2.1},
        "stages": [
            {"name": "plan", "cache_key": "3f2a9c01", "cached": False, "seconds": 0.4},
            {"name": "distill", "cache_key": "a1b2c3d4", "cached": True, "seconds": 0.0},
            {"name": "finetune", "cache_key": "e5f6a7b8", "cached": False, "seconds": 812.3},
            {"name": "export-gguf", "cache_key": "c9d0e1f2", "cached": False, "seconds": 41.0},
            {"name": "export-onnx", "cache_key": "0a1b2c3d", "cached": False, "seconds": 63.9},
            {"name": "bench", "cache_key": "4e5f6a7b", "cached": False, "seconds": 95.2},
        ],
        "distill": {"loss_curve": dist_curve,
                    "before": {"kl_to_teacher": 3.1, "perplexity": 95.0, "top1_agreement": 0.31, "retention": 0.19},
                    "after": {"kl_to_teacher": 0.72, "perplexity": 27.5, "top1_agreement": 0.58, "retention": 0.66},
                    "retention": {"definition": "teacher perplexity / model perplexity on held-out text",
                                  "teacher": 1.0, "before": 0.19, "after": 0.66},
                    "student": {"params": 61_000_000}},
        "finetune": {"loss_curve": ft_curve,
                     "accuracy_by_step": [{"step": 50, "task_accuracy": 0.2}, {"step": 100, "task_accuracy": 0.55},
                                          {"step": 150, "task_accuracy": 0.7}, {"step": 200, "task_accuracy": 0.78}],
                     "before": {"task_accuracy": 0.02, "valid_json_rate": 0.1, "general_perplexity": 27.5},
                     "after": {"task_accuracy": 0.78, "valid_json_rate": 0.97, "general_perplexity": 29.1},
                     "config": {"method": "lora", "rank": 16, "steps": 200},
                     "forgetting": {"general_perplexity_delta_pct": 5.8}},
        "artifacts": [
            {"path": "model-Q4_K_M.gguf", "format": "gguf", "quant": "Q4_K_M", "size_bytes": 48_300_000,
             "verify": {"mean_kl": 0.041, "top1_agreement": 0.93, "passed": True}, "task_accuracy": 0.76,
             "bench": [{"target": "local", "prefill_tokens_per_s": 210.5, "decode_tokens_per_s": 38.2,
                        "peak_rss_bytes": 120_000_000}]},
            {"path": "onnx-int8", "format": "onnx", "quant": "int8", "size_bytes": 70_100_000,
             "verify": {"mean_kl": 0.012, "top1_agreement": 0.97, "passed": True}, "task_accuracy": 0.77,
             "bench": [{"target": "local", "prefill_tokens_per_s": 150.0, "decode_tokens_per_s": 22.4,
                        "peak_rss_bytes": 260_000_000}]},
        ],
        "speed": [
            {"profile": "raspberry-pi-zero-2w", "artifact": "model-Q4_K_M.gguf",
             "estimated_decode_tokens_per_s": 6.3, "measured_decode_tokens_per_s": None},
            {"profile": "local", "artifact": "model-Q4_K_M.gguf", "estimated_decode_tokens_per_s": 41.0,
             "measured_decode_tokens_per_s": 38.2},
            {"profile": "local", "artifact": "onnx-int8", "estimated_decode_tokens_per_s": 25.0,
             "measured_decode_tokens_per_s": 22.4},
        ],
        "lineage": {"teacher": {"name": "smollm2-135m-instruct", "sha256": "ab" * 32},
                    "data": {"corpus.txt": "cd" * 32, "commands.jsonl": "ef" * 32},
                    "stages": {"finetune": {"method": "lora", "rank": 16, "steps": 200}},
                    "libraries": {"torch": "2.13.0", "llama-cpp-python": "0.3.36"}, "seed": 0},
        "chat_template": SMOLLM2_TEMPLATE,
        "stop_tokens": ["<|im_end|>"],
    }


@pytest.fixture
def summary() -> dict:
    return _summary()


@pytest.fixture
def ship_dir(tmp_path: Path) -> Path:
    """A ship folder as the pipeline leaves it before write_ship: artifacts (stand-in bytes) and tokenizer."""
    d = tmp_path / "ship"
    (d / "onnx-int8").mkdir(parents=True)
    (d / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    (d / "onnx-int8" / "model.onnx").write_bytes(b"\x08\x07" + b"onnx" * 1000)
    (d / "onnx-int8" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    return d


def test_manifest_checksums_the_folder_and_detects_a_flipped_byte(ship_dir: Path, summary: dict) -> None:
    manifest = write_ship(ship_dir, summary)
    on_disk = json.loads((ship_dir / "manifest.json").read_text())
    assert on_disk["schema"] == MANIFEST_SCHEMA == manifest["schema"]
    assert set(on_disk["files"]) == {"model-Q4_K_M.gguf", "onnx-int8/model.onnx", "onnx-int8/tokenizer.json",
                                     "README.md", "Modelfile", "report.html"}
    assert on_disk["files"] == file_entries(ship_dir)
    assert on_disk["lineage"] == summary["lineage"]
    assert on_disk["plan"]["decision"] == "both" and on_disk["created_utc"].endswith("Z")
    assert on_disk["quality"]["artifacts"]["model-Q4_K_M.gguf"]["mean_kl"] == 0.041
    assert not list(ship_dir.glob(".*.tmp")), "atomic writes must not leave temp files"
    assert check_manifest(ship_dir) == []

    p = ship_dir / "onnx-int8" / "model.onnx"
    data = bytearray(p.read_bytes())
    data[100] ^= 0x01  # same size: only the hash can tell
    p.write_bytes(bytes(data))
    assert check_manifest(ship_dir) == ["onnx-int8/model.onnx"]
    (ship_dir / "README.md").unlink()
    (ship_dir / "extra.txt").write_text("added after shipping")
    assert check_manifest(ship_dir) == ["README.md", "extra.txt", "onnx-int8/model.onnx"]


def test_model_card_front_matter_and_numbers(summary: dict) -> None:
    card = model_card(summary)
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    meta = yaml.safe_load(m.group(1))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert {"edgeforge", "gguf", "onnx", "raspberry-pi-zero-2w", "distillation", "fine-tuned"} <= set(meta["tags"])
    assert meta["library_name"]
    for section in ("## What it is", "## Device profile", "## How it was made", "## Quality", "## Speed",
                    "## How to run it", "## Limitations"):
        assert section in card
    # Numbers come from the summary: retention, task accuracy, KL, the unmeasured speed said to be unmeasured.
    assert "66.0% after" in card and "78.0% after" in card and "0.0410" in card
    assert "not measured" in card and "ollama create" in card and "llama-cli -m ./model-Q4_K_M.gguf" in card

    sparse = _summary()
    sparse["teacher"]["license"] = None
    sparse["distill"] = sparse["finetune"] = None
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", model_card(sparse), re.S).group(1))
    assert meta["license"] == "other" and "distillation" not in meta["tags"]
    assert "license was not recorded" in model_card(sparse)


def test_modelfile_chatml_and_fallback() -> None:
    mf = modelfile("model-Q4_K_M.gguf", SMOLLM2_TEMPLATE, ["<|im_end|>", "<|endoftext|>"], num_ctx=1024)
    assert "FROM ./model-Q4_K_M.gguf" in mf
    template = re.search(r'TEMPLATE """(.*?)"""', mf, re.S).group(1)
    assert "<|im_start|>{{ .Role }}" in template and "<|im_start|>assistant" in template
    assert 'PARAMETER stop "<|im_end|>"' in mf and 'PARAMETER stop "<|endoftext|>"' in mf
    assert "PARAMETER num_ctx 1024" in mf
    # The template's default system prompt, which Ollama sends when the conversation has no system message.
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in mf

    plain = modelfile("m.gguf", "{{ bos_token }}[INST] {{ messages }}", [])
    assert 'TEMPLATE """{{ .Prompt }}"""' in plain and "not ChatML" in plain
    assert "<|im_start|>" not in plain and "SYSTEM" not in plain and "PARAMETER stop" not in plain
    assert "has no chat template" in modelfile("m.gguf", None, ["</s>"])
    assert "num_batch" not in mf
    assert "PARAMETER num_batch 2048" in modelfile("m.gguf", None, [], num_batch=2048)


def test_report_plots_sustained_windows_only_when_a_sustained_run_exists(summary: dict) -> None:
    """A bench row with a sustained run (bench.sustained_s) adds the windows plot, its drop in the legend."""
    assert 'id="plot-sustained"' not in render_report(summary)
    windows = [{"index": i, "start_s": 10.0 * i, "end_s": 10.0 * (i + 1), "tokens_per_s": v}
               for i, v in enumerate((40.0, 37.5, 34.0))]
    summary["artifacts"][0]["bench"][0]["sustained"] = {"windows": windows, "first_window_tokens_per_s": 40.0,
                                                        "last_window_tokens_per_s": 34.0, "drop_percent": 15.0}
    page = render_report(summary)
    m = re.search(r'<figure id="plot-sustained">(.*?)</figure>', page, re.S)
    assert m and "<svg" in m.group(1) and "15.0%" in m.group(1)


def test_report_is_self_contained_with_three_svg_plots(summary: dict) -> None:
    page = render_report(summary)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "no external references"
    assert "<script" not in page and "<link" not in page
    for fig_id in ("plot-training", "plot-tradeoff", "plot-speed"):
        m = re.search(rf'<figure id="{fig_id}">(.*?)</figure>', page, re.S)
        assert m and "<svg" in m.group(1) and "<figcaption>" in m.group(1), fig_id
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "ids of the inline SVGs must not collide"
    assert "both" in page and "812.3" in page and "cached" in page

    hostile = _summary()
    hostile["name"] = "<script>alert(1)</script>"
    assert "<script>alert" not in render_report(hostile)

    empty = render_report({"name": "nothing yet"})
    assert "<svg" not in empty and empty.count('class="note"') >= 3


# ---------------------------------------------------------------- real browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _browser(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    # --user-data-dir: a fresh profile per run; --no-sandbox: CI runs as root, where the sandbox refuses to start.
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=180, check=True)


# Added to the test's copy of the page only (the report itself has no script): each figure's box on the page, written
# into the DOM so that --dump-dom reports where the screenshot should show each plot.
_RECTS_JS = """<script>addEventListener("load", () => { const r = {};
for (const f of document.querySelectorAll("figure")) { const b = f.querySelector("svg").getBoundingClientRect();
  r[f.id] = [b.left, b.top + scrollY, b.right, b.bottom + scrollY].map(Math.round); }
const p = document.createElement("pre"); p.id = "rects"; p.textContent = JSON.stringify(r);
document.body.append(p); });</script>"""


def _coloured(rgb) -> int:
    """Pixels whose channels differ by more than a quarter: plot colours; text, tables and page are grey."""
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).sum())


def test_report_renders_in_headless_chromium(tmp_path: Path, summary: dict) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    from matplotlib.image import imread  # pillow underneath, a dependency matplotlib always installs

    window = "--window-size=1200,4000"
    full, bare, probe = tmp_path / "report.html", tmp_path / "bare.html", tmp_path / "probe.html"
    page = render_report(summary)
    full.write_text(page, encoding="utf-8")
    probe.write_text(page.replace("</body>", _RECTS_JS + "</body>"), encoding="utf-8")
    # The same page without the data the plots are made of: tables and notes only, the baseline for colour.
    plotless = copy.deepcopy(summary)
    plotless.update(distill=None, finetune=None, speed=[])
    for a in plotless["artifacts"]:
        a.pop("size_bytes")
    bare.write_text(render_report(plotless), encoding="utf-8")
    assert "<svg" not in bare.read_text()

    dom = _browser(exe, tmp_path, window, "--dump-dom", probe.as_uri()).stdout
    for fig_id in ("plot-training", "plot-tradeoff", "plot-speed"):
        m = re.search(rf'<figure id="{fig_id}">(.*?)</figure>', dom, re.S)
        assert m and re.search(r"<svg[^>]*viewBox", m.group(1)) and "<path" in m.group(1), fig_id
    rects = json.loads(re.search(r'<pre id="rects">(.*?)</pre>', dom, re.S).group(1))

    shots = {}
    for html_page in (full, bare):
        png = tmp_path / f"{html_page.stem}.png"
        _browser(exe, tmp_path, f"--screenshot={png}", window, html_page.as_uri())
        shots[html_page.stem] = imread(png)[..., :3]
    # A page whose SVG failed to draw, or the plot-less page, colours almost no pixel; each drawn plot colours
    # hundreds to thousands (lines, markers, bars) inside its own box.
    assert _coloured(shots["bare"]) < 200, _coloured(shots["bare"])
    assert set(rects) == {"plot-training", "plot-tradeoff", "plot-speed"}
    height, width = shots["report"].shape[:2]
    counts = {}
    for fig_id, (left, top, right, bottom) in rects.items():
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, (fig_id, rects[fig_id], (width, height))
        counts[fig_id] = _coloured(shots["report"][top:bottom, left:right])
    assert min(counts.values()) > 400 and sum(counts.values()) > 5_000, counts
