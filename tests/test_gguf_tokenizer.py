"""The tokenizer rebuilt from a GGUF gives llama.cpp's own token ids, for every byte-level pre-tokenizer llama.cpp
knows: a tiny byte-level BPE vocabulary is trained in-test with ``tokenizers``, written into a vocabulary-only GGUF
under each ``tokenizer.ggml.pre`` value, tokenized by llama.cpp and by the rebuilt HF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeforge.models.gguf_hf import rebuildable_pre_tokenizers, rebuilt_tokenizer

MIXED = [
    "Héllo wörld! naïve café, Ελληνικά, русский текст",
    "🤖🚀 emoji 👍🏽 and ZWJ 👨‍👩‍👧 sequences",
    "日本語のテキスト、中文字符。한국어 텍스트",
    "def f(x):\n    return x**2  # comment\n\n\tindented\r\n",
    "digits 1234567890 12 345 6789012 3.14159 1e-5 0x1F $100.00",
    "contractions: don't I'll WE'RE they've she's it'd You'LL",
    "spaces   and  tabs\t\t and\n\n\nnewlines   ",
    '<tag attr="v"> -- \'quoted\' "double" ...!!! ~^|+=<>',
]


def _tiny_vocab() -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = MIXED * 3 + ["the quick brown fox jumps over the lazy dog, 0123456789 times"] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


@pytest.fixture(scope="module")
def vocab() -> tuple[list[str], list[str]]:
    return _tiny_vocab()


def _vocab_only_gguf(path: Path, tokens: list[str], merges: list[str], pre: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_rules_come_from_llama_cpp_and_differ_where_they_should() -> None:
    from edgeforge.models.llama_vocab import pre_tokenizer_rules
    from edgeforge.models.support import llama_tree_dir

    rules = pre_tokenizer_rules(llama_tree_dir())
    assert {"smollm", "llama-bpe", "qwen2", "gpt-2", "default", "tekken"} <= set(rules)
    assert "\\p{N}{1,3}" in rules["llama-bpe"].regexes[0] and rules["llama-bpe"].ignore_merges
    assert rules["qwen2"].regexes != rules["gpt-2"].regexes != rules["llama-bpe"].regexes
    assert rules["smollm"].regexes[0] == "\\p{N}"  # digits one by one, then GPT-2's regex
    assert len(rebuildable_pre_tokenizers()) >= 60


# Listed by name so that a pre-tokenizer the pinned llama.cpp adds or drops shows up as a test to look at.
@pytest.mark.parametrize("pre", sorted(rebuildable_pre_tokenizers()))
def test_rebuilt_tokenizer_matches_llama_cpp(pre: str, vocab: tuple[list[str], list[str]], tmp_path: Path) -> None:
    from llama_cpp import Llama

    path = _vocab_only_gguf(tmp_path / f"{pre}.gguf", *vocab, pre)
    llm = Llama(str(path), vocab_only=True, verbose=False)
    tok, _ = rebuilt_tokenizer(path)
    for text in MIXED:
        expected = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert tok.encode(text, add_special_tokens=False).ids == expected, (pre, text)


def test_llama3_and_qwen2_split_digits_their_own_way(vocab: tuple[list[str], list[str]], tmp_path: Path) -> None:
    """The bug the rebuild fixes: both used to get GPT-2's regex (digit runs whole)."""
    pieces = {}
    for pre in ("llama-bpe", "qwen2", "gpt-2"):
        tok, _ = rebuilt_tokenizer(_vocab_only_gguf(tmp_path / f"{pre}.gguf", *vocab, pre))
        pieces[pre] = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("1234567")]
    assert pieces["llama-bpe"] == ["123", "456", "7"]
    assert pieces["qwen2"] == list("1234567")
    assert pieces["gpt-2"] == ["1234567"]


def test_a_sentencepiece_gguf_is_refused_with_the_fix(vocab: tuple[list[str], list[str]], tmp_path: Path) -> None:
    import gguf

    from edgeforge.errors import ModelError

    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="HF directory"):
        rebuilt_tokenizer(path)
