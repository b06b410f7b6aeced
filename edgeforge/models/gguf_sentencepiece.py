"""A SentencePiece GGUF vocabulary (``tokenizer.ggml.model == "llama"``: Llama 2, Gemma, Phi-3, Mistral v0.1) rebuilt
as the two files an HF model directory holds: ``tokenizer.model`` and ``tokenizer.json``.

The GGUF keeps what llama.cpp's converter read from the model's ``tokenizer.model``: every piece with its score and
type (the GGUF token types are SentencePiece's piece types, same numbers), and whether a space is put before the
text. From those:

- ``tokenizer.model`` is written back with SentencePiece's own protobuf schema (``sentencepiece_model_pb2``), so a
  student made from this teacher is converted by llama.cpp to the same vocabulary (its converter reads
  ``tokenizer.model`` for Llama, Gemma and Phi-3);
- ``tokenizer.json`` is a ``tokenizers`` BPE whose merges are the pairs of pieces that join into a piece, ranked by
  that piece's score (transformers' ``generate_merges``), with byte fallback. That is what llama.cpp's SPM tokenizer
  does: it joins the adjacent pair whose joined text is the highest-scoring piece, and spells a character that no
  piece covers as ``<0xXX>`` byte pieces. The text is prefixed with a space (when the GGUF says so) and its spaces
  written as U+2581, again per section between special tokens, as llama.cpp does.

Tested against llama.cpp's own tokenization (tests/test_gguf_tokenizer.py).
"""

from __future__ import annotations

from typing import Any

SPACE = "\u2581"  # SentencePiece's visible space
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2  # sentencepiece TrainerSpec.ModelType.BPE


def add_space_prefix(fields: dict[str, Any]) -> bool:
    """llama.cpp's default for an SPM vocabulary is to prefix the text with a space unless the GGUF says not to."""
    value = fields.get("tokenizer.ggml.add_space_prefix")
    return True if value is None else bool(value)


def sentencepiece_refusal(tokens: list[str], scores: list[float] | None, types: list[int] | None) -> str | None:
    """Why a SentencePiece vocabulary cannot be rebuilt exactly, or None: no scores (they are the merge order), or
    no byte pieces (llama.cpp spells characters outside the vocabulary with them)."""
    if scores is None or len(scores) != len(tokens):
        return (f"a SentencePiece vocabulary needs tokenizer.ggml.scores for its {len(tokens)} pieces, found "
                f"{0 if scores is None else len(scores)}")
    n_bytes = sum(1 for t in types or [] if t == _BYTE)
    if n_bytes != 256:
        return (f"expected the 256 byte pieces <0x00>..<0xFF> of a byte-fallback SentencePiece vocabulary, "
                f"found {n_bytes}")
    return None


def sentencepiece_tokenizer(tokens: list[str], scores: list[float], types: list[int], *, prefix_space: bool,
                            unk_id: int | None, bos_id: int | None, eos_id: int | None, add_bos: bool,
                            add_eos: bool) -> Any:
    """The ``tokenizers.Tokenizer`` llama.cpp's SPM tokenizer is, for one vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.convert_slow_tokenizer import generate_merges

    vocab = {t: i for i, t in enumerate(tokens)}
    # Only the pieces llama.cpp may join into count: its bigram search looks up any vocabulary text, so a pair
    # joining into a control or byte piece (rare) is kept as well, with that piece's score.
    merges = generate_merges(vocab, list(zip(tokens, scores, strict=True)))
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Normalisers run per section between added tokens, as llama.cpp prefixes the text after each special token.
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if prefix_space else [])
                                          + [normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty in (_CONTROL, _USER_DEFINED)])
    bos = tokens[bos_id] if add_bos and bos_id is not None else None
    eos = tokens[eos_id] if add_eos and eos_id is not None else None
    if bos or eos:
        one = " ".join(x for x in (bos, "$A", eos) if x)
        tok.post_processor = processors.TemplateProcessing(
            single=one, pair=f"{one} " + one.replace("$A", "$B"),
            special_tokens=[(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t])
    return tok


def sentencepiece_model_bytes(tokens: list[str], scores: list[float], types: list[int], *, prefix_space: bool,
                              unk_id: int | None, bos_id: int | None, eos_id: int | None,
                              pad_id: int | None) -> bytes:
    """A serialised SentencePiece ``ModelProto`` holding the GGUF's pieces, scores and types, as the model's
    ``tokenizer.model`` held them."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    for t, s, ty in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=t, score=float(s), type=ty if ty in range(_NORMAL, _BYTE + 1) else _NORMAL)
    spec = proto.trainer_spec
    spec.model_type = _BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id = (-1 if i is None else int(i) for i in (unk_id, bos_id, eos_id))
    spec.pad_id = -1 if pad_id is None or pad_id in (unk_id, bos_id, eos_id) else int(pad_id)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = prefix_space
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()
