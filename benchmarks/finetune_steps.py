"""How home-commands accuracy grows with LoRA steps on the bundled teacher, and whether the merged model keeps it
through GGUF export. Prints one Markdown table.

Run: .venv/bin/python benchmarks/finetune_steps.py [--steps 200] [--method lora] [--out /tmp/edgeforge-ft-bench]
     [--reuse DIR]

--reuse DIR takes the merged model and finetune.json of an earlier
``edgeforge finetune smollm2-135m-instruct --task home-commands --merge --out DIR`` run (for example the acceptance
check's) instead of training again: a 200-step run takes 15+ minutes on 2 cores, and the table then describes exactly
that run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeforge-ft-bench"))
    ap.add_argument("--reuse", type=Path, default=None, help="an earlier merged finetune output dir")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from edgeforge.export.gguf import export_gguf
    from edgeforge.finetune.config import FinetuneConfig
    from edgeforge.finetune.run import run_finetune
    from edgeforge.models.refs import ModelRef
    from edgeforge.tasks.examples import load_task_examples
    from edgeforge.tasks.metrics import artifact_task_metrics

    out = args.out / args.method
    cfg = FinetuneConfig(method=args.method, steps=args.steps, checkpoint_every=max(1, args.steps // 4))
    if args.reuse is not None:
        out = args.reuse
        rec = json.loads((out / "finetune.json").read_text(encoding="utf-8"))
        if "merge" not in rec:
            raise SystemExit(f"{out}: not a merged run (finetune --merge); cannot export it")
        cfg = FinetuneConfig(**{k: v for k, v in rec["config"].items() if k in FinetuneConfig.model_fields})
        args.method = cfg.method
    else:
        rec = run_finetune("smollm2-135m-instruct", out, cfg, task="home-commands", merge=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gguf = export_gguf(ModelRef(str(out), out, "hf"), "Q8_0", args.out / f"{args.method}-q8_0.gguf")["path"]
    _, held, _ = load_task_examples("home-commands", None)
    tok = AutoTokenizer.from_pretrained(str(out))
    q8 = artifact_task_metrics(Path(gguf), tok, held[: cfg.eval_examples])
    print(f"LoRA-family `{args.method}` rank {cfg.rank} on home-commands, bundled teacher, batch {cfg.batch_size}, "
          f"lr {cfg.lr}; accuracy = exact match on held-out examples ({cfg.eval_examples} at the end, 30 at "
          "intermediate steps).\n")
    print("| step | held-out exact match |")
    print("|---|---|")
    print(f"| 0 (base) | {rec['before']['task_accuracy']:.0%} |")
    for p in rec["accuracy_by_step"]:
        print(f"| {p['step']} | {p['task_accuracy']:.0%} |")
    b, a, m = rec["before"], rec["after"], rec["merge"]
    print("\n| model | exact match | valid JSON | general perplexity |\n|---|---|---|---|")
    print(f"| base | {b['task_accuracy']:.1%} | {b['valid_json_rate']:.1%} | {b['general_perplexity']:.2f} |")
    print(f"| adapter | {a['task_accuracy']:.1%} | {a['valid_json_rate']:.1%} | {a['general_perplexity']:.2f} |")
    print(f"| merged (torch) | {m['task_accuracy']:.1%} | {m['valid_json_rate']:.1%} | |")
    print(f"| merged, Q8_0 GGUF (llama.cpp) | {q8['task_accuracy']:.1%} | {q8['valid_json_rate']:.1%} | |")
    print(f"\nmerge check: max |logit diff| {m['logit_max_abs_diff']:.2e}; training {rec['train_seconds']:.0f} s for "
          f"{rec['train_tokens']:,} tokens")
    (args.out / f"{args.method}-summary.json").write_text(json.dumps({"finetune": rec, "q8_0": q8}, default=str))


if __name__ == "__main__":
    main()
