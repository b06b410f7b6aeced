"""The tokenizer rebuilt from a GGUF gives llama.cpp's own token ids, for every byte-level pre-tokenizer llama.cpp
knows: a tiny byte-level BPE vocabulary is trained in-test with ``tokenizers``, written into a vocabulary-only GGUF
under each ``tokenizer.ggml.pre`` value, tokenized by llama.cpp and by the rebuilt HF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import MIXED_TEXT, train_tiny_sentencepiece

from edgeforge.models.gguf_hf import rebuildable_pre_tokenizers, rebuilt_tokenizer

MIXED = MIXED_TEXT


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


def _tiny_sentencepiece(path: Path) -> Path:
    """A SentencePiece BPE model with byte fallback, trained in-test as Llama 2's / Gemma's were."""
    return train_tiny_sentencepiece(path, [*MIXED, "the quick brown fox jumps over the lazy dog, 0123456789 times"])


def _spm_vocab_only_gguf(path: Path, model_file: Path, *, prefix_space: bool, shuffle_scores: bool = False) -> Path:
    """A vocabulary-only GGUF holding what llama.cpp's converter writes for ``tokenizer.model``
    (conversion/base.py ``_create_vocab_sentencepiece``): each piece, its score and its type.

    ``shuffle_scores`` permutes the scores so that they no longer fall with the id (as a trained model's do): the
    merge order must then follow the scores, as llama.cpp's does, not the ids."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(path), arch="llama")
    for add in (w.add_block_count, w.add_head_count):
        add(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    scores = [sp.get_score(i) for i in range(n)]
    if shuffle_scores:  # among the normal pieces only: their scores stay distinct, as a trained model's are
        import random

        normal = [i for i in range(n) if types[i] == 1]
        permuted = [scores[i] for i in normal]
        random.Random(0).shuffle(permuted)
        for i, score in zip(normal, permuted, strict=True):
            scores[i] = score
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(prefix_space)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_EXTRA = [" leading space", "  two leading spaces", "trailing space ", "x", "unknown: \u2603 \U0001f9ff \u00e6"]


@pytest.mark.parametrize(("prefix_space", "shuffle_scores"), [(True, False), (False, False), (True, True)],
                         ids=["space-prefix", "no-space-prefix", "scores-not-by-id"])
def test_sentencepiece_tokenizer_matches_llama_cpp(prefix_space: bool, shuffle_scores: bool, tmp_path: Path) -> None:
    from llama_cpp import Llama

    path = _spm_vocab_only_gguf(tmp_path / "spm.gguf", _tiny_sentencepiece(tmp_path / "sp.model"),
                                prefix_space=prefix_space, shuffle_scores=shuffle_scores)
    llm = Llama(str(path), vocab_only=True, verbose=False)
    tok, _ = rebuilt_tokenizer(path)
    for text in MIXED + SPM_EXTRA:
        expected = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert tok.encode(text, add_special_tokens=False).ids == expected, text
    # BOS first, as llama.cpp adds it for an SPM vocabulary.
    assert tok.encode("hello").ids == llm.tokenize(b"hello", add_bos=True, special=False)


def test_sentencepiece_directory_round_trips(tmp_path: Path) -> None:
    """The HF directory holds a ``tokenizer.model`` with the GGUF's pieces, scores and types (what llama.cpp's
    converter reads back for a student), and AutoTokenizer loads ``tokenizer.json`` as rebuilt."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from edgeforge.models.gguf_hf import write_canonical_tokenizer

    source = _tiny_sentencepiece(tmp_path / "sp.model")
    gguf_path = _spm_vocab_only_gguf(tmp_path / "spm.gguf", source, prefix_space=True)
    out = tmp_path / "hf"
    write_canonical_tokenizer(gguf_path, out)
    a = spm.SentencePieceProcessor(model_file=str(source))
    b = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    n = a.get_piece_size()
    assert b.get_piece_size() == n
    for i in range(n):
        assert (b.id_to_piece(i), b.get_score(i), b.is_byte(i), b.is_control(i), b.is_unknown(i)) == \
            (a.id_to_piece(i), a.get_score(i), a.is_byte(i), a.is_control(i), a.is_unknown(i)), i
    hf = AutoTokenizer.from_pretrained(out)
    rebuilt, _ = rebuilt_tokenizer(gguf_path)
    for text in MIXED:
        assert hf(text, add_special_tokens=False)["input_ids"] == rebuilt.encode(text, add_special_tokens=False).ids
        assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
    assert hf("hi")["input_ids"][0] == 1 and hf.bos_token == "<s>" and hf.eos_token == "</s>"


def test_an_unknown_tokenizer_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    import gguf

    from edgeforge.errors import ModelError

    path = tmp_path / "ugm.gguf"
    w = gguf.GGUFWriter(str(path), arch="t5")
    w.add_tokenizer_model("t5")
    w.add_token_list(["<pad>", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="HF directory"):
        rebuilt_tokenizer(path)


def test_a_sentencepiece_gguf_without_byte_pieces_is_refused(vocab: tuple[list[str], list[str]],
                                                              tmp_path: Path) -> None:
    import gguf

    from edgeforge.errors import ModelError

    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab[0])
    w.add_token_scores([0.0] * len(vocab[0]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="256 byte pieces"):
        rebuilt_tokenizer(path)


def test_a_model_without_a_chat_template_is_prompted_with_plain_text(tmp_path: Path) -> None:
    """Base checkpoints (Llama 2, Gemma -pt) have no chat template, on which transformers' apply_chat_template
    raises: prompts are then the contents in turn, after the BOS the tokenizer adds, and the loss mask still
    covers the prompt only."""
    from tiny_models import write_sentencepiece_tokenizer
    from transformers import AutoTokenizer

    from edgeforge.data.chat import conversation_text, prompt_format, prompt_ids, prompt_text
    from edgeforge.tasks.examples import IGNORE_INDEX, encode_example

    write_sentencepiece_tokenizer(tmp_path, "llama")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert not tok.chat_template and prompt_format(tok) == "plain text"
    msgs = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of sky?\n"},
            {"role": "assistant", "content": "blue"}]
    assert prompt_text(tok, msgs[:-1]) == "<s>Answer in one word.\nColour of sky?\n"
    assert conversation_text(tok, msgs) == "<s>Answer in one word.\nColour of sky?\nblue"
    ids = prompt_ids(tok, msgs[:-1])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Answer in one word.\nColour of sky?\n"
    input_ids, labels = encode_example(tok, msgs, max_len=64)
    n_prompt = len(ids)
    assert input_ids[:n_prompt] == ids and labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(input_ids[n_prompt:], skip_special_tokens=True) == "blue"
    assert input_ids[-1] == tok.eos_token_id
