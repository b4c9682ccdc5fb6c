"""GRPO on the demo model: rollout frames per second (ours against a naive loop) and where a step's time goes.

1. **Rollouts**: one step's candidates (``--prompts`` x ``--group``, exact mode, one seed each) drawn by
   the shared engine with continuous batching (``s2train.rl.rollout.draw_groups``), against the naive
   loop (``generate_naive``) over the same requests one by one; both draw the same tokens (checked),
   so the ratio is the engine's alone.
2. **A step**: ``stage=grpo`` for ``--steps`` steps on a finished demo run (``--run-root``, default
   ``runs``: ``python -m s2train experiment=demo`` first), with the demo's rewards; the mean seconds of
   rollout, scoring and update per step and their shares, from its ``metrics.jsonl``.

    python benchmarks/grpo.py                        # after python -m s2train experiment=demo
    python benchmarks/grpo.py --run-root /tmp/runs --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from s2train.checkpoints import open_dual_ar
from s2train.inference.engine import InferenceEngine
from s2train.inference.naive import generate_naive
from s2train.inference.sampling import SamplingParams
from s2train.rl.rollout import RolloutPrompt, draw_groups
from s2train.text.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "The morning train was late again, so we walked to the office.",
    "Please put the green box on the table near the window.",
    "My brother likes to cook rice and beans on Sunday evenings.",
    "It started to rain just as the game was about to begin.",
]


def rollouts(model_dir: Path, prompts: int, group: int, max_new: int) -> dict:
    model, _ = open_dual_ar(model_dir)
    tokenizer = ByteTokenizer(4, model.config.codebook_size)
    im_end = tokenizer.token_id("<|im_end|>")
    sampling = SamplingParams.exact_at(0.7)
    chosen = [RolloutPrompt(str(i), TEXTS[i % len(TEXTS)]) for i in range(prompts)]
    engine = InferenceEngine(model, im_end, max_batch=prompts * group)
    args = dict(group_size=group, sampling=sampling, max_new_tokens=max_new, seed=0, step=0)
    draw_groups(engine, tokenizer, chosen[:1], **{**args, "group_size": 2})  # warm up
    started = time.perf_counter()
    ours = draw_groups(engine, tokenizer, chosen, **args)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    naive = [
        generate_naive(
            model,
            c.prompt,
            im_end_id=im_end,
            max_new_tokens=max_new,
            sampling=sampling,
            generator=torch.Generator().manual_seed(seed),
        )
        for c, seed in zip(ours, [_seed(c) for c in ours])
    ]
    naive_s = time.perf_counter() - started
    same = all(torch.equal(a.generation.tokens, b.tokens) for a, b in zip(ours, naive))
    frames = sum(c.generation.codes.shape[1] for c in ours)
    return {
        "candidates": len(ours),
        "frames": frames,
        "engine_frames_per_s": round(frames / ours_s, 1),
        "naive_frames_per_s": round(frames / naive_s, 1),
        "speedup": round(naive_s / ours_s, 2),
        "same_tokens": same,
    }


def _seed(candidate) -> int:
    from s2train.rl.rollout import candidate_seed

    return candidate_seed(0, 0, candidate.prompt_index, candidate.candidate)


def step_shares(run_root: Path, steps: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "s2train",
                "experiment=demo",
                "stage=grpo",
                f"run_root={run_root}",
                f"run_dir={tmp}/grpo",
                f"grpo.train.max_steps={steps}",
                "grpo.train.progress=false",
                f"grpo.train.threads={threads}",
                "grpo.eval_every=1000",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        rows = [json.loads(line) for line in (Path(tmp) / "grpo" / "metrics.jsonl").read_text().splitlines()]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("rollout_s", "score_s", "update_s")}
    total = sum(mean.values())
    return {
        "steps": len(rows),
        **{f"{k}_per_step": round(v, 2) for k, v in mean.items()},
        **{f"{k[:-2]}_share": round(v / total, 3) for k, v in mean.items()},
        "frames_per_step": round(sum(r["frames"] for r in rows) / len(rows), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-root", type=Path, default=ROOT / "runs")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=300)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.run_root / "demo" / "sft"
    if not (model_dir / "model.json").is_file():
        raise SystemExit(
            f"{model_dir} has no model: run python -m s2train experiment=demo run_root={args.run_root}"
        )
    out = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "rollouts": rollouts(model_dir, args.prompts, args.group, args.max_new),
        "step": step_shares(args.run_root, args.steps, args.threads),
    }
    path = ROOT / "benchmarks" / "results" / "grpo.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
