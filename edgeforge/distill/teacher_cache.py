"""What the teacher produces once and every later run reuses: top-k log-probabilities and generated answers.

Token level (offline distillation): the teacher's top-k log-probabilities at every position of the training
sequences a run visits, stored as safetensors shards (``values`` fp16 [rows, seq_len, k] and ``indices`` int32
[rows, seq_len, k]: 6k bytes per token) under ``<cache>/topk-<key>``, where the key hashes the teacher's identity,
the exact training token ids, k and the teacher's precision. Only sequences no shard holds are computed; shards are
written atomically, so epochs, reruns and resumed runs reuse them and a killed run loses at most one shard.

Sequence level: the teacher's greedy answers to a built-in prompt set (llama.cpp on a GGUF teacher: fast on a CPU;
transformers otherwise), cached as JSONL keyed by the teacher, the prompts and the answer length.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from edgeforge.errors import EdgeforgeError
from edgeforge.fileio import content_identity, stable_hash, write_text_atomic
from edgeforge.progress import progress

CACHE_FORMAT = 1
SHARD_ROWS = 256

# Short, varied requests a small on-device assistant gets; the teacher's answers are sequence-level KD data.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain what a Python list comprehension is.",
    "Give three tips for writing readable code.",
    "What does the 'with' statement do in Python?",
    "Write a haiku about a small computer.",
    "What is the difference between a list and a tuple?",
    "How do I read a text file line by line in Python?",
    "Why is the sky blue?",
    "Summarize the water cycle in two sentences.",
    "What is a dictionary in Python?",
    "List three uses of a Raspberry Pi.",
    "What is recursion? Give a short example.",
    "How many days are in a leap year?",
    "Explain what an exception is in programming.",
    "What does HTTP stand for?",
    "Write a short email asking for a meeting next week.",
    "What is the boiling point of water at sea level?",
    "How does a for loop work?",
    "Name three renewable energy sources.",
    "What is a generator function in Python?",
    "Translate 'good morning' into Spanish.",
    "What is the difference between RAM and storage?",
    "Give a one-sentence definition of machine learning.",
    "How do I sort a list of numbers in Python?",
    "What is photosynthesis?",
    "Suggest a name for a pet turtle.",
    "What does the 'return' statement do?",
    "Explain what a variable is to a beginner.",
    "What are the primary colors?",
    "How do you convert a string to an integer in Python?",
    "What is the largest planet in our solar system?",
    "Write a limerick about a cat.",
    "What is a lambda function?",
    "Why do we need sleep?",
    "What is the purpose of a unit test?",
    "How do I check if a key exists in a dictionary?",
    "What is gravity?",
    "Give me a quick recipe for scrambled eggs.",
    "What is the difference between '==' and 'is' in Python?",
    "What is an operating system?",
    "Explain what JSON is.",
    "How can I reverse a string in Python?",
    "What causes the seasons on Earth?",
    "Write a motivational sentence for a student.",
    "What is a class in object-oriented programming?",
    "How do I handle errors with try and except?",
    "What is the speed of light?",
    "Name three famous painters.",
    "What does 'import' do in Python?",
    "What is the difference between weather and climate?",
    "How do I create a virtual environment in Python?",
    "What is a prime number?",
    "Describe a sunset in one sentence.",
    "What is the purpose of the '__init__' method?",
    "How does a refrigerator keep food cold?",
    "What is an API?",
    "Give two advantages of walking every day.",
    "How do I join a list of strings with commas?",
    "What is the tallest mountain in the world?",
    "Explain what 'None' means in Python.",
    "What is a CPU?",
    "How can I measure how long a piece of code takes to run?",
    "What is the difference between a compiler and an interpreter?",
    "Write a two-line poem about the ocean.",
)
MAX_NEW_TOKENS = 64


def sha256_of(obj: Any) -> str:
    """A stable hash of a JSON-serialisable object (edgeforge.fileio.stable_hash), or of a tensor's shape and values."""
    if isinstance(obj, Tensor):
        h = hashlib.sha256()
        h.update(str(tuple(obj.shape)).encode())
        h.update(obj.detach().cpu().contiguous().to(torch.int64).numpy().tobytes())
        return h.hexdigest()
    return stable_hash(obj)


def model_identity(path: Path) -> dict[str, Any]:
    """What identifies a teacher: the content of every file of its directory (config.json and the tokenizer
    included: they change the logits as surely as the weights do), or of its GGUF file; never modification times,
    so a touched teacher still hits its cache and a changed one never does."""
    return {"path": str(path.resolve()), "content": content_identity(path)}


class TopKCache:
    """The teacher's top-k log-probabilities over a fixed set of training sequences, in safetensors shards.

    A shard holds the rows (sequence indices) one fill computed: ``rows`` int64 [r], ``values`` fp16 [r, S, k],
    ``indices`` int32 [r, S, k]. Only the sequences a run will visit are computed (a 30-step run touches a few
    hundred of thousands), and later runs add shards for the rows they miss.
    """

    def __init__(self, root: Path, teacher_id: dict[str, Any], sequences: Tensor, k: int,
                 teacher_dtype: str, shard_rows: int = SHARD_ROWS) -> None:
        """root: the cache folder; sequences: [n_seq, seq_len] int64, the exact training token ids."""
        if k < 1:
            raise ValueError(f"top-k must be >= 1, got {k}")
        self.sequences = sequences
        self.n_rows, self.seq_len = int(sequences.shape[0]), int(sequences.shape[1])
        self.k, self.shard_rows = int(k), int(shard_rows)
        self.key = sha256_of({"format": CACHE_FORMAT, "teacher": teacher_id, "data": sha256_of(sequences),
                              "k": self.k, "teacher_dtype": teacher_dtype})
        self.dir = root / f"topk-{self.key[:20]}"
        self.meta = {"format": CACHE_FORMAT, "key": self.key, "teacher": teacher_id, "k": self.k,
                     "seq_len": self.seq_len, "n_sequences": self.n_rows, "teacher_dtype": teacher_dtype,
                     "values_dtype": "float16", "indices_dtype": "int32", "bytes_per_token": self.bytes_per_token}
        self._where: dict[int, tuple[Path, int]] = {}  # row -> (shard, position in it)
        self._scan()

    @property
    def bytes_per_token(self) -> int:
        """k fp16 log-probabilities + k int32 ids."""
        return self.k * (2 + 4)

    def refresh(self) -> None:
        """Re-read which rows the shards on disk hold (after another process filled the cache)."""
        self._scan()

    def _scan(self) -> None:
        from safetensors import safe_open

        for f in sorted(self.dir.glob("shard-*.safetensors")) if self.dir.is_dir() else []:
            with safe_open(str(f), framework="pt") as st:
                for i, r in enumerate(st.get_tensor("rows").tolist()):
                    self._where.setdefault(int(r), (f, i))

    def missing(self, rows: Iterable[int]) -> list[int]:
        """The sorted ``rows`` no shard holds yet."""
        return sorted({int(r) for r in rows} - set(self._where))

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.glob("shard-*.safetensors")) if self.dir.is_dir() else 0

    def fill(self, rows: list[int], teacher_logits: Callable[[Tensor], Tensor], batch_size: int) -> int:
        """Compute and write the top-k of ``rows``; ``teacher_logits`` maps ids [b, S] to logits [b, S, V].

        Shards of up to ``shard_rows`` rows are written atomically, one by one. Returns the teacher forward passes.
        """
        from safetensors.torch import save_file

        from edgeforge.distill.losses import teacher_topk

        if not rows:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dir / "meta.json", json.dumps(self.meta, indent=1))
        passes = 0
        with progress(f"teacher top-{self.k} cache", total=len(rows), unit="seq") as shown:
            for start in range(0, len(rows), self.shard_rows):
                part = torch.tensor(rows[start:start + self.shard_rows], dtype=torch.int64)
                vals, ids = [], []
                with torch.no_grad():
                    for b in range(0, len(part), batch_size):
                        v, i = teacher_topk(teacher_logits(self.sequences[part[b:b + batch_size]]), self.k)
                        passes += 1
                        vals.append(v.to(torch.float16).cpu())
                        ids.append(i.to(torch.int32).cpu())
                        shown.advance(len(part[b:b + batch_size]))
                path = self.dir / f"shard-{sha256_of(part)[:16]}.safetensors"
                tmp = path.with_suffix(".partial")
                save_file({"rows": part, "values": torch.cat(vals).contiguous(),
                           "indices": torch.cat(ids).contiguous()}, str(tmp), metadata={"key": self.key})
                os.replace(tmp, path)
                for i, r in enumerate(part.tolist()):
                    self._where[int(r)] = (path, i)
        return passes

    def lookup(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """rows: [b] sequence indices -> (log-probs [b, S, k] fp16, token ids [b, S, k] int64).

        Each row is copied out of its shard on demand and the shard is closed again: resident memory stays at one
        batch whatever the cache's size on disk (100M tokens at k=64 is about 38 GB). Keeping shards loaded (or
        even mapped: the pages a lookup touched stay resident while the mapping lives) grew with every shard read.
        """
        from safetensors import safe_open

        where = []
        for r in rows.tolist():
            if int(r) not in self._where:
                raise EdgeforgeError(f"offline teacher cache {self.dir}: sequence {r} is not cached; rerun on one "
                                     "process to extend the cache")
            where.append(self._where[int(r)])
        vals: list[Tensor | None] = [None] * len(where)
        ids: list[Tensor | None] = [None] * len(where)
        for path in dict.fromkeys(p for p, _ in where):  # each shard opened once per lookup, in first-use order
            with safe_open(str(path), framework="pt") as shard:
                values, indices = shard.get_slice("values"), shard.get_slice("indices")
                for n, (p, i) in enumerate(where):
                    if p == path:
                        vals[n], ids[n] = values[i:i + 1][0].clone(), indices[i:i + 1][0].clone()
        return torch.stack(vals), torch.stack(ids).long()  # type: ignore[arg-type]


# ---------------------------------------------------------------- sequence level: the teacher's answers
def answers_path(root: Path, teacher_id: dict[str, Any], prompts: tuple[str, ...], max_new_tokens: int) -> Path:
    key = sha256_of({"format": CACHE_FORMAT, "teacher": teacher_id, "prompts": list(prompts),
                     "max_new_tokens": max_new_tokens, "decoding": "greedy"})
    return root / f"answers-{key[:20]}.jsonl"


def _answers_llama_cpp(gguf: Path, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    from llama_cpp import Llama

    from edgeforge.quiet import captured_stderr

    with captured_stderr() as log:
        try:
            # half the cores: llama.cpp's spinning threads slow to a crawl when every core is also busy elsewhere
            llm = Llama(str(gguf), n_ctx=512, n_batch=256, n_threads=max(1, (os.cpu_count() or 2) // 2),
                        verbose=False, seed=0)
        except (ValueError, RuntimeError) as e:
            raise EdgeforgeError(f"{gguf}: llama.cpp cannot load the teacher to generate answers ({e}; "
                                 f"{log.tail()})") from None
        out = []
        for ids in prompt_ids:  # greedy, no repetition penalty: the teacher's own most likely answer
            r = llm.create_completion(prompt=ids, max_tokens=max_new_tokens, temperature=0.0, repeat_penalty=1.0,
                                      top_k=1)
            out.append(r["choices"][0]["text"])
    return out


def _answers_transformers(model: Any, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int,
                          batch_size: int = 16) -> list[str]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def teacher_answers(tokenizer: Any, cache_root: Path, teacher_id: dict[str, Any], gguf: Path | None,
                    load_model: Callable[[], Any], prompts: tuple[str, ...] = BUILTIN_PROMPTS,
                    max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The teacher's greedy answers to ``prompts`` as chats [{"prompt", "answer"}], and how they were obtained.

    With a GGUF teacher llama.cpp generates (fast on a CPU); otherwise ``load_model()`` gives a transformers model.
    Cached: a second call with the same teacher, prompts and length reads the JSONL file.
    """
    path = answers_path(cache_root, teacher_id, prompts, max_new_tokens)
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return rows, {"cache_hit": True, "path": str(path), "seconds": 0.0, "engine": None}
    t0 = time.perf_counter()
    prompt_ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=True)) for p in prompts]
    if gguf is not None:
        engine = "llama.cpp"
        answers = _answers_llama_cpp(gguf, prompt_ids, max_new_tokens)
    else:
        engine = "transformers"
        answers = _answers_transformers(load_model(), tokenizer, prompt_ids, max_new_tokens)
    rows = [{"prompt": p, "answer": a.strip()} for p, a in zip(prompts, answers, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows, {"cache_hit": False, "path": str(path), "seconds": round(time.perf_counter() - t0, 2),
                  "engine": engine}


def answer_documents(rows: list[dict[str, str]], tokenizer: Any) -> list[str]:
    """Each prompt and answer as one chat document, in the teacher's chat template."""
    docs = []
    for r in rows:
        if not r["answer"]:
            continue
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]
        docs.append(tokenizer.apply_chat_template(msgs, tokenize=False))
    return docs
