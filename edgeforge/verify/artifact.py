"""Verify an artifact (GGUF through llama.cpp, ONNX through onnxruntime) against its source torch model.

On held-out text it measures mean KL(source || artifact), top-1 agreement and the perplexity delta, and it compares
greedy generations on a few chat prompts. Thresholds are per quant type, grounded in llama.cpp's published KLD table
(for LLaMA-3-8B) and in what the bundled 135M teacher measures here: small models lose more per bit than
LLaMA-3-8B, so the thresholds sit above both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeforge.data.chat import prompt_format, prompt_ids
from edgeforge.errors import BadInputError, QualityGateError
from edgeforge.models.refs import ModelRef
from edgeforge.verify.metrics import Agreement, agreement

DEFAULT_VERIFY_TOKENS = 1000
GREEDY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about a small computer.",
    "List three uses of a Raspberry Pi.",
)
GREEDY_NEW_TOKENS = 16
MIN_VERIFY_TOKENS = 16  # fewer positions say nothing about an artifact's distribution


@dataclass(frozen=True)
class Threshold:
    max_mean_kl: float
    min_top1: float


# Measured on the bundled teacher over 1,000 tokens of prose (KLD / top-1): Q8_0 0.004 / 95%, Q6_K 0.009 / 94.5%,
# Q4_K_M 0.053 / 87%, Q4_0 0.25 / 74%; ONNX int8 weight-only 0.003 / 96.5%, int4 RTN 0.24 / 74%; Q3_K_M with the
# importance matrix 0.078 / 83.9% (benchmarks/budget_quant.py), given IQ4_XS's margins.
THRESHOLDS: dict[str, Threshold] = {
    "F32": Threshold(1e-3, 0.99), "F16": Threshold(2e-3, 0.98), "BF16": Threshold(5e-3, 0.97),
    "Q8_0": Threshold(0.015, 0.93), "Q6_K": Threshold(0.03, 0.91), "Q5_K_M": Threshold(0.05, 0.89),
    "Q4_K_M": Threshold(0.08, 0.84), "IQ4_XS": Threshold(0.12, 0.82), "Q4_0": Threshold(0.35, 0.68),
    "Q3_K_M": Threshold(0.12, 0.80),
    "fp32": Threshold(1e-3, 0.99), "fp16": Threshold(2e-3, 0.98), "none": Threshold(1e-3, 0.99),
    "int8": Threshold(0.02, 0.93), "int4": Threshold(0.35, 0.68),
}


def threshold_for(quant: str) -> Threshold:
    return THRESHOLDS.get(quant, Threshold(0.35, 0.68))


#: llama.cpp's flag on ``general.file_type`` when the type was guessed from the tensors, not written by its tool.
GGUF_FILE_TYPE_GUESSED = 1024


def gguf_file_type(path: Path) -> str | None:
    """The type a GGUF file declares in ``general.file_type`` ("Q4_K_M", "F16", ...), read with gguf-py; None when
    the file declares none."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    except (ValueError, OSError, IndexError) as e:
        detail = " ".join(str(e).split())[:160]
        raise BadInputError(f"{path}: not a readable GGUF file, corrupt or truncated ({detail})") from None
    if field is None:
        return None
    value = int(field.parts[field.data[0]][0]) & ~GGUF_FILE_TYPE_GUESSED
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        raise BadInputError(f"{path}: general.file_type {value} is unknown to this gguf-py; pass --quant") from None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def onnx_weight_bits(model_dir: Path) -> str:
    """What an ONNX decoder's graph holds: "int4" when any MatMulNBits node has 4-bit weights, "int8" when they
    are all 8-bit, "none" (float) without MatMulNBits. Reads the graph only, not the external weights."""
    import onnx

    model_file = model_dir / "model.onnx"
    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception as e:  # noqa: BLE001 - a damaged file raises protobuf's DecodeError, a missing one OSError
        raise BadInputError(f"{model_file}: not a readable ONNX model ({type(e).__name__}); pass --quant") from None
    bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    return "int4" if 4 in bits else "int8" if bits else "none"


def artifact_quant(artifact: Path, record: dict[str, Any]) -> str:
    """The quant type an artifact really is, for its thresholds: a GGUF's own ``general.file_type`` (the file is
    the truth; its record only when the file declares none), an ONNX directory's record (``quantize``) or else its
    graph (a fitted mix: the type it is judged as). ``record``: the artifact's export record, {} when it has none."""
    if artifact.is_dir() or artifact.suffix == ".onnx":
        found = record.get("quantize") or record.get("quant")
        if found == "fit":  # a fitted 4/8-bit mix is judged by what it holds (export.onnx.fit.OnnxFit.judged_as)
            found = (record.get("fit") or {}).get("judged_as")
        return str(found) if found else onnx_weight_bits(artifact if artifact.is_dir() else artifact.parent)
    declared = gguf_file_type(artifact)
    if declared is not None:
        return declared
    if record.get("quant"):
        return str(record["quant"])
    raise BadInputError(f"{artifact}: the file declares no general.file_type and has no export record; pass --quant "
                        f"(one of {', '.join(THRESHOLDS)})")


class Reference:
    """The source model in torch (fp32), with its tokenizer. A GGUF source is dequantized into an HF dir once."""

    def __init__(self, ref: ModelRef, cache_root: Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edgeforge.models.gguf_hf import hf_dir_for, materialize_hf
        from edgeforge.paths import edgeforge_home

        self.ref = ref
        if ref.format == "gguf":
            self.hf_dir = materialize_hf(ref.path, hf_dir_for(ref.path, cache_root or edgeforge_home()))
        else:
            self.hf_dir = ref.path
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.hf_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.hf_dir), dtype=torch.float32).eval()

    def encode(self, text: str, max_tokens: int) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[n_tokens, vocab] float32 logits of one forward pass over ``token_ids``."""
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([token_ids])).logits[0].float().numpy()

    def chat_prompt_ids(self, question: str) -> list[int]:
        return prompt_ids(self.tokenizer, [{"role": "user", "content": question}])

    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        import torch

        x = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                      pad_token_id=self.tokenizer.eos_token_id)
        return out[0, len(prompt_ids):].tolist()


class GgufEngine:
    """A GGUF file in llama.cpp (llama-cpp-python)."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None) -> None:
        from llama_cpp import Llama

        from edgeforge.quiet import captured_stderr

        with captured_stderr() as log:
            try:
                self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False,
                                 n_threads=threads or os.cpu_count())
            except (ValueError, RuntimeError) as e:
                detail = "; ".join(x for x in (str(e), log.tail()) if x)
                raise BadInputError(f"{path}: llama.cpp cannot load this GGUF: corrupt, truncated or of an unsupported "
                                    f"architecture ({detail})") from None

    def logits(self, token_ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(token_ids)
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def greedy(self, prompt_ids: list[int], n: int, eos: int | None) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt_ids)
        out: list[int] = []
        for _ in range(n):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if nxt == eos:
                break
            self.llm.eval([nxt])
        return out


def match_cache_to_graph(model: Any) -> None:
    """Make optimum's empty KV cache match the graph's own ``past_key_values`` shapes [batch, kv_heads, 0, head_dim].

    optimum-onnx 0.1.0's ORTModelForCausalLM derives them from the config with per-family rules that are wrong
    for some families it exports: Phi-3 is taken to have as many KV heads as query heads (Phi-4-mini has 24 and 8),
    and head_dim is hidden_size / heads except for Gemma (Qwen3-0.6B has 1024 / 16 = 64, its head_dim is 128; a
    width-pruned student has an explicit head_dim too). The first call then fails in onnxruntime ("invalid
    dimensions for input: past_key_values.0.value"). The exported graph states both as static dimensions.
    """
    for node in model.session.get_inputs():
        if node.name.startswith("past_key_values") and node.name.endswith(".key"):
            kv_heads, head_dim = node.shape[1], node.shape[3]
            if isinstance(kv_heads, int) and isinstance(head_dim, int):
                model.num_key_value_heads = kv_heads
                if hasattr(model, "embed_size_per_head"):
                    model.embed_size_per_head = head_dim
            return


class OnnxEngine:
    """An optimum-exported ONNX decoder directory in onnxruntime."""

    def __init__(self, path: Path) -> None:
        from optimum.onnxruntime import ORTModelForCausalLM

        try:
            self.model = ORTModelForCausalLM.from_pretrained(str(path))
        except Exception as e:  # noqa: BLE001 - optimum/onnxruntime raise many types on a corrupt model
            raise BadInputError(f"{path}: onnxruntime cannot load this ONNX model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from None
        match_cache_to_graph(self.model)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        import torch

        x = torch.tensor([token_ids])
        out = self.model(input_ids=x, attention_mask=torch.ones_like(x))
        return np.asarray(out.logits[0], dtype=np.float32)

    def greedy(self, prompt_ids: list[int], n: int, eos: int | None) -> list[int]:
        import torch

        x = torch.tensor([prompt_ids])
        out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                  pad_token_id=eos)
        return out[0, len(prompt_ids):].tolist()


def open_engine(artifact: Path, n_ctx: int) -> GgufEngine | OnnxEngine:
    if not artifact.exists():
        raise BadInputError(f"{artifact}: artifact not found")
    if artifact.is_dir() or artifact.suffix == ".onnx":
        return OnnxEngine(artifact if artifact.is_dir() else artifact.parent)
    if artifact.suffix.lower() == ".gguf":
        return GgufEngine(artifact, n_ctx)
    raise BadInputError(f"{artifact}: expected a .gguf file or an ONNX model directory")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def verify_artifact(
    artifact: Path,
    reference: Reference,
    quant: str,
    text: str | None = None,
    n_tokens: int = DEFAULT_VERIFY_TOKENS,
    enforce: bool = True,
    threshold: Threshold | None = None,
) -> dict[str, Any]:
    """Measure ``artifact`` against ``reference``; raise QualityGateError when ``enforce`` and a threshold breaks.

    ``threshold`` overrides the per-type default (``--quant auto`` gates on the user's KL budget instead).
    """
    from edgeforge.data.builtin import heldout_prose

    ids = reference.encode(text or heldout_prose(), n_tokens)
    if len(ids) < MIN_VERIFY_TOKENS:
        raise BadInputError(f"verification text has only {len(ids)} tokens; give at least {MIN_VERIFY_TOKENS}")
    if len(ids) < n_tokens:
        source = "the given text" if text else "the built-in held-out prose"
        raise BadInputError(f"verification asks for {n_tokens} tokens, {source} has {len(ids)}; ask for at most "
                            f"{len(ids)} (--tokens) or give a longer held-out text (--data)")
    engine = open_engine(artifact, n_ctx=max(len(ids), 256) + 64)
    test = engine.logits(ids)
    ref = reference.logits(ids)
    if test.shape[-1] != ref.shape[-1]:
        raise QualityGateError(f"{artifact}: vocabulary of {test.shape[-1]} tokens, its source has {ref.shape[-1]}")
    agree: Agreement = agreement(ref, test, np.array(ids))
    eos = reference.tokenizer.eos_token_id
    greedy = []
    for q in GREEDY_PROMPTS:
        p = reference.chat_prompt_ids(q)
        want, got = reference.greedy(p, GREEDY_NEW_TOKENS), engine.greedy(p, GREEDY_NEW_TOKENS, eos)
        greedy.append({
            "prompt": q, "match": want == got[: len(want)], "common_prefix_tokens": _common_prefix(want, got),
            "reference": reference.tokenizer.decode(want), "artifact": reference.tokenizer.decode(got),
        })
    th = threshold or threshold_for(quant)
    failures = []
    if not np.isfinite(agree.mean_kl) or agree.mean_kl > th.max_mean_kl:
        failures.append(f"mean KL {agree.mean_kl:.4f} > {th.max_mean_kl}")
    if agree.top1_agreement < th.min_top1:
        failures.append(f"top-1 agreement {agree.top1_agreement:.1%} < {th.min_top1:.0%}")
    result = {
        **agree.to_dict(),
        # Greedy decoding flips at near-ties even when the distributions agree closely (KL ~0.007 at the flip on
        # the bundled teacher), so greedy match is reported, not gated.
        "greedy_match_rate": sum(g["match"] for g in greedy) / len(greedy),
        "greedy_mean_common_prefix_tokens": sum(g["common_prefix_tokens"] for g in greedy) / len(greedy),
        "greedy": greedy,
        "greedy_prompt_format": prompt_format(reference.tokenizer),
        "threshold": {"max_mean_kl": th.max_mean_kl, "min_top1": th.min_top1, "quant": quant},
        "passed": not failures,
        "failures": failures,
        "reference": reference.ref.name,
    }
    if enforce and failures:
        raise QualityGateError(f"{artifact} fails verification against {reference.ref.name} at {quant}: "
                               + "; ".join(failures) + " (the artifact is kept for inspection)")
    return result
