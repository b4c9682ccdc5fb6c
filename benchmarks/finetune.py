"""LoRA against full fine-tuning on this CPU: the time of a training step and the peak memory of a process.

For each preset (``--presets``, default ``demo small``) and each method, a fresh process (so that its peak
resident memory, ``ru_maxrss``, is its own) builds the model the way ``stage=finetune`` does: the preset
fitted to the byte tokenizer (``fit_model_to_data``), ``DualARModule`` with the stage's ``adapt`` (peft
LoRA on every attention and MLP projection of both models, rank ``--rank``, or all weights trainable),
then its own ``configure_optimizers()`` (AdamW over the trainable weights). It trains ``--warmup`` +
``--steps`` steps on the same batches (``benchmarks/train.py``'s synthetic packed sequences through the
real prompt builder, ``--batch`` x ``--len`` positions): ``losses(batch)``, backward, gradient clipping,
optimizer and schedule steps. The first ``--warmup`` steps are not timed.

Reported per preset: ms per step and peak RSS of each method, trainable weights, and the ratios LoRA /
full (below 1: LoRA is cheaper). Both runs start from the same weights (seed), so their first losses agree
(checked).

    python benchmarks/finetune.py                   # demo and small, 1 thread, about 20 min
    python benchmarks/finetune.py --presets demo --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train import synthetic_sequences  # noqa: E402
from s2train.checkpoints import LoraSettings  # noqa: E402
from s2train.models.dual_ar import demo, small, tiny  # noqa: E402
from s2train.text.tokenizer import ByteTokenizer  # noqa: E402
from s2train.training.finetune_stage import FinetuneConfig, adapter_for  # noqa: E402
from s2train.training.lm_data import Collate  # noqa: E402
from s2train.training.lm_module import DualARModule, LMTrainConfig  # noqa: E402
from s2train.training.pretrain_stage import fit_model_to_data  # noqa: E402

PRESETS = {"tiny": tiny, "demo": demo, "small": small}


def worker(args) -> dict:
    """One (preset, method) run in this process; prints its figures as JSON."""
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]()
    tokenizer = ByteTokenizer(4, preset.codebook_size)
    cfg, _ = fit_model_to_data(preset, tokenizer, None)
    steps = args.warmup + args.steps
    train = LMTrainConfig(max_steps=steps + 1, warmup_steps=1, lr=1e-4, progress=False)
    method = FinetuneConfig(method=args.method, lora=LoraSettings(r=args.rank, alpha=2.0 * args.rank))
    sequences = synthetic_sequences(tokenizer, cfg, args.batch * 2, args.len, args.seed)
    collate = Collate(tokenizer.token_id("<|pad|>"), pad_to=args.len)
    batches = [collate(sequences[i : i + args.batch]) for i in range(0, len(sequences), args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        module = DualARModule(cfg, train, Path(tmp), adapt=adapter_for(method))
        module.configure_model()
        optimizers = module.configure_optimizers()
        optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
        trainable = [p for p in module.model.parameters() if p.requires_grad]
        module.train()
        times, losses = [], []
        for step in range(steps):
            batch = batches[step % len(batches)]
            started = time.perf_counter()
            loss = module.losses(batch)["loss/total"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
            losses.append(float(loss))
    timed = times[args.warmup :]
    return {
        "preset": args.preset,
        "method": args.method,
        "ms_per_step": round(1000 * statistics.mean(timed), 1),
        "ms_per_step_stdev": round(1000 * statistics.stdev(timed), 1) if len(timed) > 1 else 0.0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "trainable_M": round(sum(p.numel() for p in trainable) / 1e6, 3),
        "total_M": round(sum(p.numel() for p in module.model.parameters()) / 1e6, 3),
        "first_loss": round(losses[0], 5),
        "last_loss": round(losses[-1], 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="*", default=["demo", "small"], choices=sorted(PRESETS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/finetune.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    common = [
        f"--{k}={getattr(args, k)}" for k in ("rank", "batch", "len", "warmup", "steps", "threads", "seed")
    ]
    results = []
    for preset in args.presets:
        runs = {}
        for method in ("full", "lora"):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", f"--preset={preset}", f"--method={method}", *common],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = runs[method]
            print(
                f"{preset:>6} {method:>5}: {r['ms_per_step']:8.1f} ms/step, peak {r['peak_rss_mb']:8.1f} MB, "
                f"{r['trainable_M']:.3f}M of {r['total_M']:.3f}M weights trained",
                flush=True,
            )
        full, lora = runs["full"], runs["lora"]
        assert abs(full["first_loss"] - lora["first_loss"]) < 1e-4, (
            "the two runs did not start from one model"
        )
        results.append(
            {
                "preset": preset,
                "full": full,
                "lora": lora,
                "step_time_ratio_lora_over_full": round(lora["ms_per_step"] / full["ms_per_step"], 3),
                "peak_rss_ratio_lora_over_full": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
                "trainable_ratio": round(lora["trainable_M"] / full["trainable_M"], 4),
            }
        )
        print(
            f"{preset:>6} LoRA / full: step time x{results[-1]['step_time_ratio_lora_over_full']}, "
            f"peak memory x{results[-1]['peak_rss_ratio_lora_over_full']}",
            flush=True,
        )
    report = {
        "command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "settings": {
            k: getattr(args, k) for k in ("rank", "batch", "len", "warmup", "steps", "threads", "seed")
        },
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
