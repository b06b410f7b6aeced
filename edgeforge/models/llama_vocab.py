"""llama.cpp's own pre-tokenizer definitions, read from the source of the pinned tree (``src/llama-vocab.cpp``).

A GGUF names its pre-tokenizer (``tokenizer.ggml.pre``: ``llama-bpe``, ``qwen2``, ``smollm``, ...); what the name
means lives only in llama.cpp's C++: a chain of ``tokenizer_pre == "..."`` tests that pick an
``LLAMA_VOCAB_PRE_TYPE_*`` (and whether whole words skip the merges), and a switch that gives each type its list of
regexes, applied one after the other, each splitting the pieces the previous one left. Copying those regexes by
hand is how the GPT-2 regex ended up standing in for Llama 3's and Qwen2's, so they are parsed from the source of
the exact llama.cpp that runs the artifact.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from edgeforge.errors import ModelError

_NAME_TEST = re.compile(r'if\s*\(\s*((?:tokenizer_pre\s*==\s*"[^"]*"\s*(?:\|\|\s*)?)+)\)\s*\{([^{}]*)\}')
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0"}


@dataclass(frozen=True)
class PreTokenizerRule:
    """What one ``tokenizer.ggml.pre`` value means to llama.cpp."""

    name: str
    pre_type: str  # the LLAMA_VOCAB_PRE_TYPE_* suffix
    regexes: tuple[str, ...]  # applied in order; each splits every piece the previous one produced
    ignore_merges: bool  # a whole piece found in the vocabulary is one token, before any merge
    byte_encode: bool  # GPT-2 byte-to-unicode encoding of the pieces (False: raw UTF-8)
    #: Regexes llama.cpp does not run as regexes but hands to a C++ splitter of another meaning (Kimi K2's
    #: ``\\p{Han}+`` stands for a whole hand-written pattern): no regex engine reproduces them.
    opaque_regexes: tuple[str, ...] = ()


def _unescape(literal: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), literal)


def _regexes_by_type(source: str) -> dict[str, tuple[tuple[str, ...], bool]]:
    start = source.index("struct llm_tokenizer_bpe")
    start = source.index("switch (vocab.get_pre_type())", start)
    end = source.index("std::vector<std::string> regex_exprs;", start)
    out: dict[str, tuple[tuple[str, ...], bool]] = {}
    labels: list[str] = []
    regexes: list[str] = []
    byte_encode, in_list = True, False
    for raw in source[start:end].splitlines():
        line = raw.strip()
        if line.startswith("//"):
            continue
        if m := re.match(r"case\s+LLAMA_VOCAB_PRE_TYPE_(\w+)\s*:", line):
            labels.append(m.group(1))
        elif line.startswith("default:"):
            labels.append("DEFAULT")
        elif line.startswith("regex_exprs"):
            in_list = True
        elif in_list:
            if line.startswith("};"):
                in_list = False
            else:
                regexes += [_unescape(s) for s in _STRING.findall(line)]
        elif line.startswith("byte_encode = false"):
            byte_encode = False
        elif line.startswith("break;") and labels:
            for label in labels:
                out[label] = (tuple(regexes), byte_encode)
            labels, regexes, byte_encode = [], [], True
    return out


def _names(source: str) -> dict[str, tuple[str, bool]]:
    start = source.index("if (type == LLAMA_VOCAB_TYPE_BPE)")
    end = source.index("else if (type == LLAMA_VOCAB_TYPE_SPM)", start)
    out: dict[str, tuple[str, bool]] = {}
    for cond, body in _NAME_TEST.findall(source[start:end]):
        m = re.search(r"pre_type\s*=\s*LLAMA_VOCAB_PRE_TYPE_(\w+)\s*;", body)
        if not m:
            continue
        ignore_merges = bool(re.search(r"ignore_merges\s*=\s*true", body))
        for name in re.findall(r'"([^"]*)"', cond):
            out.setdefault(name, (m.group(1), ignore_merges))
    return out


#: C++ splitters of ``src/unicode.cpp`` that implement exactly the regex they are keyed on (llama.cpp's faster path
#: for common patterns); tests/test_gguf_tokenizer.py checks each against llama.cpp. Any other keyed splitter
#: (kimi_k2, afmoe, ...) means something its key does not say.
REGEX_EQUIVALENT_SPLITTERS = frozenset({"gpt2", "llama3", "qwen2", "qwen35"})


def _custom_splitters(unicode_source: str) -> dict[str, str]:
    """``{regex: splitter name}`` for the regexes ``unicode_regex_split_custom`` hands to C++ code."""
    start = unicode_source.index("unicode_regex_split_custom(")
    start = unicode_source.index("{", start)
    end = unicode_source.index("return bpe_offsets;", start)
    out: dict[str, str] = {}
    pending: list[str] = []
    for chunk in re.split(r"(unicode_regex_split_custom_\w+)", unicode_source[start:end]):
        if chunk.startswith("unicode_regex_split_custom_"):
            out.update({r: chunk[len("unicode_regex_split_custom_"):] for r in pending})
            pending = []
        else:
            pending += [_unescape(x) for x in re.findall(r'regex_expr\s*==\s*"((?:[^"\\]|\\.)*)"', chunk)]
    return out


@functools.cache
def _rules(vocab_source: Path) -> dict[str, PreTokenizerRule]:
    source = vocab_source.read_text(encoding="utf-8")
    unicode_source = vocab_source.with_name("unicode.cpp")
    splitters = _custom_splitters(unicode_source.read_text(encoding="utf-8")) if unicode_source.is_file() else {}
    by_type = _regexes_by_type(source)
    rules = {}
    for name, (pre_type, ignore_merges) in _names(source).items():
        regexes, byte_encode = by_type.get(pre_type, by_type["DEFAULT"])
        opaque = tuple(r for r in regexes if r in splitters and splitters[r] not in REGEX_EQUIVALENT_SPLITTERS)
        rules[name] = PreTokenizerRule(name, pre_type, regexes, ignore_merges, byte_encode, opaque)
    return rules


def pre_tokenizer_rules(tree: Path) -> dict[str, PreTokenizerRule]:
    """Every ``tokenizer.ggml.pre`` value the llama.cpp tree at ``tree`` knows, with its rule."""
    source = tree / "src" / "llama-vocab.cpp"
    if not source.is_file():
        raise ModelError(f"{source} is missing: the llama.cpp tree is not fetched; run "
                         "'python -m edgeforge.export.llama_tools' (the Makefile's set-up does)")
    try:
        return _rules(source)
    except (ValueError, KeyError) as e:
        raise ModelError(f"{source}: its pre-tokenizer definitions could not be read ({e}); this llama.cpp "
                         "version lays them out differently from the one edgeforge was written against") from None
