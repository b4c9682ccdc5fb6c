"""Speed of a Dual-AR training step: our Lightning path against a plain PyTorch loop, and a FLOP-based MFU.

**Frames per second, CPU** (``--presets``, default ``tiny small``). For each preset the same model is
trained twice in one process, on the same batches, from the same initial weights (``--seed``; checked):

- ours: the real ``stage=pretrain`` path, ``DualARModule`` inside ``L.Trainer(accelerator="cpu",
  devices=1, max_steps=N, logger=False, enable_checkpointing=False, enable_progress_bar=False,
  gradient_clip_val=train.grad_clip, precision="32-true")``, fed a ``DataLoader``;
- baseline: a plain loop over the same ``DataLoader`` that calls the module's own ``losses(batch)`` and its
  own ``configure_optimizers()`` (AdamW, weight decay on matrices only, the warm-up/cosine schedule), then
  ``clip_grad_norm_``, ``optimizer.step()``, ``scheduler.step()``, ``zero_grad(set_to_none=True)``.

So the only difference is the framework (and ``training_step``'s logging and ``losses.jsonl`` line). The
per-step losses of both runs are compared as a check that they do the same work. The batches are built in
the real format: random text and random codes through ``build_prompt`` + ``inputs_and_labels`` (a
``ByteTokenizer``), packed with ``lm_data.pack_segments`` and collated by ``lm_data.Collate`` to exactly
``--*-len`` positions. The model is the preset fitted to that tokenizer with ``fit_model_to_data``, as
``stage=pretrain`` does with the default ``text.kind=byte``: ``small``'s vocabulary becomes 4,416 instead of
S2 Pro's 155,776 (its 12 x 768 layers, 4 fast layers and 10 codebooks of 4096/1024 are unchanged).

A step's time runs from the end of one optimizer step to the end of the next (Lightning: its
``on_train_batch_end`` hook), so it includes fetching and collating the batch. The first ``--*-warmup``
steps of every run are not timed. ``frames/s`` = timed steps x batch x positions / their summed time;
``ratio`` = ours / plain (below 1: the framework costs that fraction). With ``--*-rounds`` 2 the pair runs
twice, the second time plain first, so that load from other processes falls on both.

**FLOPs.** Training FLOPs of a step, per model, by the standard estimate (Kaplan et al. 2020, "Scaling
Laws for Neural Language Models", sec. 2.1; with the attention term of Chowdhery et al. 2022, "PaLM",
appendix B, which counts both QK^T and AV)::

    FLOPs per token = 6 * N + 12 * L * (H * Dh) * T_ctx

N: the weights of every matrix multiply one token goes through (attention and SwiGLU projections of the
L blocks, and the output head, tied or not; embedding lookups and norms excluded); H * Dh: query heads x
head dim; T_ctx: the context length (not halved for the causal mask: packed sequences run SDPA with a
dense segment mask, which computes every score). Slow model: B x T tokens, T_ctx = T. Fast model: one
row per position whose next token is semantic (the N rows of ``select_fast_rows``), K tokens each,
T_ctx = K, plus ``6 * |project_in|`` per row where Df != D. 6N assumes backward = 2 x forward, and is
not raised for activation checkpointing (model FLOPs, not hardware FLOPs). Achieved FLOP/s = FLOPs of the
timed steps / their time; MFU = achieved / ``--peak-tflops`` (no peak is assumed for a CPU).

**MFU, GPU** (when ``torch.cuda.is_available()``): the ``s2pro`` preset with random weights, the slow model
only (forward, the slow cross-entropy, backward; no optimizer step), batch ``--gpu-batch`` x
``--gpu-len`` positions in the same batch format, ``bf16-mixed`` (fp32 weights under bf16 autocast, what
``stage=pretrain`` uses on a GPU) or pure ``bf16`` weights (``--gpu-dtype``), optionally with activation
checkpointing. MFU is against the dense bf16 peak of an H100/H200 SXM, 989 TFLOP/s (``--gpu-peak-tflops``
overrides it; other GPUs need it).

    python benchmarks/train.py                       # tiny and small on CPU (about 3 min, 1 thread)
    python benchmarks/train.py --presets             # GPU measurement only (needs CUDA)

One intra-op thread by default, as in ``benchmarks/codec.py``: on the shared 2-core development machine
two threads fight other jobs for the cores. Pass ``--threads 2`` on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from s2train.models.dual_ar import DualAR, DualARConfig, s2pro, small, tiny
from s2train.text.prompt import IGNORE, build_prompt, inputs_and_labels
from s2train.text.tokenizer import ByteTokenizer
from s2train.training.lm_data import Collate, PackedSequence, Segment, pack_segments
from s2train.training.lm_module import DualARModule, LMTrainConfig
from s2train.training.pretrain_stage import fit_model_to_data
from s2train.training.trainer import checkpoint_blocks

PRESETS = {"tiny": tiny, "small": small}
H100_H200_BF16_DENSE_TFLOPS = 989.0  # SXM, dense (no 2:4 sparsity), both H100 and H200
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box and hum".split()


# ------------------------------------------------------------------------------------------------ FLOPs


def _block_params(dim: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    """Matmul weights of one block: wqkv, wo and the SwiGLU w1, w3, w2."""
    return dim * (heads + 2 * kv_heads) * head_dim + heads * head_dim * dim + 3 * dim * intermediate


def matmul_params(cfg: DualARConfig) -> dict[str, int]:
    """N of the FLOP estimate: matmul weights per slow token, per fast token, and project_in per fast row."""
    slow = cfg.n_layers * _block_params(
        cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size
    )
    fast = cfg.fast_n_layers * _block_params(
        cfg.fast_dim, cfg.fast_n_heads, cfg.fast_n_kv_heads, cfg.fast_head_dim, cfg.fast_intermediate_size
    )
    return {
        "slow": slow + cfg.vocab_size * cfg.dim,  # + the logits head (V, D)
        "fast": fast + cfg.codebook_size * cfg.fast_dim,  # + the head (C, Df) each fast token uses
        "project_in": cfg.dim * cfg.fast_dim if cfg.fast_dim != cfg.dim else 0,
    }


def matmul_params_of(model: DualAR) -> dict[str, int]:
    """The same counts read off a built model (a check of ``matmul_params``)."""

    def linears(stack: nn.Module) -> int:
        return sum(m.weight.numel() for m in stack.modules() if isinstance(m, nn.Linear))

    slow_head = model.slow.output.weight if model.slow.output is not None else model.slow.embeddings.weight
    fast_head = model.fast.output.weight
    per_token_head = fast_head.numel() // (fast_head.shape[0] if fast_head.dim() == 3 else 1)
    project_in = model.fast.project_in
    return {
        "slow": linears(model.slow.layers) + slow_head.numel(),
        "fast": linears(model.fast.layers) + per_token_head,
        "project_in": project_in.weight.numel() if project_in is not None else 0,
    }


def train_flops(cfg: DualARConfig, batch: int, seq_len: int, fast_rows: int) -> dict[str, float]:
    """Training FLOPs of one step (module docstring): slow model on batch x seq_len tokens, fast model
    on fast_rows x K tokens."""
    p = matmul_params(cfg)
    slow_tokens, fast_tokens = batch * seq_len, fast_rows * cfg.num_codebooks
    slow = (
        6 * p["slow"] * slow_tokens + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len * slow_tokens
    )
    fast = (
        6 * p["fast"] * fast_tokens
        + 6 * p["project_in"] * fast_rows
        + 12 * cfg.fast_n_layers * cfg.fast_n_heads * cfg.fast_head_dim * cfg.num_codebooks * fast_tokens
    )
    return {"slow": float(slow), "fast": float(fast), "total": float(slow + fast)}


# ------------------------------------------------------------------------------------------- batches


def synthetic_sequences(
    tokenizer: ByteTokenizer, cfg: DualARConfig, n: int, seq_len: int, seed: int
) -> list[PackedSequence]:
    """``n`` packed sequences of at most ``seq_len`` positions: utterances of random words and 48-192
    random frames, through the real prompt builder and packer (one speaker, so they pack together)."""
    g = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int, shape: tuple = ()) -> Tensor:
        return torch.randint(low, high, shape, generator=g)

    K = cfg.num_codebooks
    sequences = []
    for i in range(n):
        segments: list[Segment] = []
        used = 0
        while True:
            text = " ".join(WORDS[int(j)] for j in randint(0, len(WORDS), (int(randint(3, 10)),)))
            header = build_prompt(tokenizer, text, K).tokens.shape[1]  # the generation prompt
            room = seq_len - used - header
            if room < 8:
                break
            frames = min(room, int(randint(48, 193)))
            codes = randint(0, cfg.residual_codebook_size, (K, frames))
            codes[0] = randint(0, cfg.codebook_size, (frames,))
            inputs, labels = inputs_and_labels(build_prompt(tokenizer, text, K, codes=codes), tokenizer)
            assert inputs.shape[1] == header + frames  # the frames, then <|im_end|> as the last label
            segments.append(Segment(f"s{i}u{len(segments)}", "speaker", inputs, labels))
            used += inputs.shape[1]
        inputs, labels, positions, segment_ids = pack_segments(segments)
        keys = [s.key for s in segments]
        sequences.append(PackedSequence(inputs, labels, positions, segment_ids, keys, (0, 1, 0, i + 1, 0)))
    return sequences


def fast_rows(batch: dict, cfg: DualARConfig) -> int:
    """Positions whose next token is semantic: the fast model's rows (``select_fast_rows``)."""
    return int(cfg.is_semantic(batch["labels"][:, 0]).sum())


# ------------------------------------------------------------------------------------ the two loops


class StepClock(L.Callback):
    """The time at the end of every optimizer step, the step's loss and the threads torch runs on."""

    def __init__(self):
        self.start = 0.0
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.threads = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.threads = torch.get_num_threads()
        self.ends.append(time.perf_counter())


@torch.no_grad()
def fingerprint(module: DualARModule) -> list[float]:
    return [float(p.double().sum()) for p in module.model.parameters()]


def new_module(cfg: DualARConfig, train: LMTrainConfig, run_dir: Path, seed: int) -> DualARModule:
    torch.manual_seed(seed)
    module = DualARModule(cfg, train, run_dir)
    module.configure_model()  # here, so both runs draw the same weights; Lightning's call is then a no-op
    return module


def run_lightning(cfg, train, loader, steps, seed, run_dir) -> dict:
    module = new_module(cfg, train, run_dir, seed)
    init = fingerprint(module)
    clock = StepClock()
    started = time.perf_counter()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=train.grad_clip or None,
        precision="32-true",
        log_every_n_steps=train.log_every,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
        callbacks=[clock],
    )
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == steps, trainer.global_step
    times = [b - a for a, b in zip([clock.start, *clock.ends[:-1]], clock.ends)]
    return {
        "times": times,
        "losses": clock.losses,
        "init": init,
        "startup_s": clock.start - started,
        "threads": clock.threads,
    }


def run_plain(cfg, train, loader, steps, seed, run_dir) -> dict:
    module = new_module(cfg, train, run_dir, seed)
    init = fingerprint(module)
    started = time.perf_counter()
    module.train()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ends, losses = [], []
    start = time.perf_counter()
    while len(ends) < steps:
        for batch in loader:
            loss = module.losses(batch)["loss/total"]
            loss.backward()
            if train.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            ends.append(time.perf_counter())
            if len(ends) == steps:
                break
    times = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    return {
        "times": times,
        "losses": losses,
        "init": init,
        "startup_s": start - started,
        "threads": torch.get_num_threads(),
    }


def summarise(times: list[float], frames_per_step: int, flops_per_step: float, peak_tflops) -> dict:
    total = sum(times)
    row = {
        "timed_steps": len(times),
        "seconds_per_step_mean": round(total / len(times), 4),
        "seconds_per_step_median": round(statistics.median(times), 4),
        "frames_per_s": round(frames_per_step * len(times) / total, 1),
        "frames_per_s_median_step": round(frames_per_step / statistics.median(times), 1),
        "gflops_per_s": round(flops_per_step * len(times) / total / 1e9, 2),
        "step_seconds": [round(t, 4) for t in times],
    }
    if peak_tflops:
        row["mfu"] = round(flops_per_step * len(times) / total / (peak_tflops * 1e12), 5)
    return row


def bench_preset(name: str, args, batch: int, seq_len: int, warmup: int, steps: int, rounds: int) -> dict:
    preset = PRESETS[name]()
    tokenizer = ByteTokenizer(4, preset.codebook_size)  # text.n_speakers=4, text.n_semantic = C
    cfg, changed = fit_model_to_data(preset, tokenizer, None)
    if seq_len > cfg.max_seq_len:
        raise SystemExit(f"{name}: {seq_len} positions exceed max_seq_len={cfg.max_seq_len}")
    train = LMTrainConfig(max_steps=warmup + steps + 1, warmup_steps=1, threads=args.threads, progress=False)
    sequences = synthetic_sequences(tokenizer, cfg, batch * args.batches, seq_len, args.seed)
    collate = Collate(tokenizer.token_id("<|pad|>"), pad_to=seq_len)
    loader = DataLoader(sequences, batch_size=batch, shuffle=False, num_workers=0, collate_fn=collate)
    batches = list(loader)
    total_steps = warmup + steps
    # every run sees batch i % len(batches) at step i; FLOPs of the timed steps, per step
    rows_per_step = [fast_rows(batches[i % len(batches)], cfg) for i in range(warmup, total_steps)]
    per_step = [train_flops(cfg, batch, seq_len, r) for r in rows_per_step]
    flops = {k: sum(f[k] for f in per_step) / steps for k in ("slow", "fast", "total")}
    frames = batch * seq_len

    runs: dict[str, list[dict]] = {"lightning": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ["lightning", "plain"] if r % 2 == 0 else ["plain", "lightning"]
            for path in order:
                run_dir = Path(tmp) / f"{path}{r}"
                run_dir.mkdir()
                fn = run_lightning if path == "lightning" else run_plain
                runs[path].append(fn(cfg, train, loader, total_steps, args.seed, run_dir))
                t = runs[path][-1]["times"][warmup:]
                print(f"  {name} round {r} {path:<9} {frames * len(t) / sum(t):9.1f} frames/s", flush=True)

    with torch.device("meta"):
        built = DualAR(cfg)  # for the parameter counts only
    assert matmul_params_of(built) == matmul_params(cfg), (matmul_params_of(built), matmul_params(cfg))
    out = {}
    for path, results in runs.items():
        times = [t for res in results for t in res["times"][warmup:]]
        out[path] = summarise(times, frames, flops["total"], args.peak_tflops) | {
            "startup_s": [round(res["startup_s"], 3) for res in results],
            "threads_in_step": sorted({res["threads"] for res in results}),
        }
    loss_diff = max(
        abs(a - b)
        for lightning, plain in zip(runs["lightning"], runs["plain"])
        for a, b in zip(lightning["losses"], plain["losses"])
    )
    return {
        "model_changes": {k: list(v) for k, v in changed.items()},
        "params": sum(p.numel() for p in built.parameters()),
        "params_slow": sum(p.numel() for p in built.slow.parameters()),
        "params_fast": sum(p.numel() for p in built.fast.parameters()),
        "matmul_params": matmul_params(cfg),
        "batch": batch,
        "seq_len": seq_len,
        "frames_per_step": frames,
        "fast_rows_per_step_mean": round(sum(rows_per_step) / steps, 1),
        "distinct_batches": len(batches),
        "warmup_steps": warmup,
        "timed_steps_per_run": steps,
        "rounds": rounds,
        "gflop_per_step": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "ours_lightning": out["lightning"],
        "plain_pytorch": out["plain"],
        "ratio_frames_per_s": round(out["lightning"]["frames_per_s"] / out["plain"]["frames_per_s"], 3),
        "overhead_ms_per_step": round(
            1000 * (out["lightning"]["seconds_per_step_mean"] - out["plain"]["seconds_per_step_mean"]), 1
        ),
        "same_init": all(lt["init"] == pl["init"] for lt in runs["lightning"] for pl in runs["plain"]),
        "max_abs_loss_diff": loss_diff,
        "first_losses": {
            "lightning": runs["lightning"][0]["losses"][:3],
            "plain": runs["plain"][0]["losses"][:3],
        },
    }


# ----------------------------------------------------------------------------------------------- GPU


def random_frame_batch(cfg: DualARConfig, batch: int, seq_len: int, device, seed: int) -> dict:
    """A batch in ``lm_data``'s contract: 32 text positions, then semantic frames to the end, trained
    from the last text position on (its label is the first frame), one segment per row."""
    g = torch.Generator().manual_seed(seed)
    K, text = cfg.num_codebooks, 32
    tokens = torch.zeros(batch, 1 + K, seq_len + 1, dtype=torch.long)
    tokens[:, 0, :text] = torch.randint(0, cfg.semantic_begin_id, (batch, text), generator=g)
    codes = torch.randint(0, cfg.residual_codebook_size, (batch, K, seq_len + 1 - text), generator=g)
    codes[:, 0] = torch.randint(0, cfg.codebook_size, (batch, seq_len + 1 - text), generator=g)
    tokens[:, 1:, text:] = codes
    tokens[:, 0, text:] = cfg.semantic_begin_id + codes[:, 0]
    labels = torch.full((batch, 1 + K, seq_len), IGNORE, dtype=torch.long)
    labels[:, :, text - 1 :] = tokens[:, :, text:]
    return {
        "inputs": tokens[:, :, :-1].to(device),
        "labels": labels.to(device),
        "positions": torch.arange(seq_len).expand(batch, seq_len).to(device),
        "segment_ids": torch.zeros(batch, seq_len, dtype=torch.long, device=device),
    }


def bench_gpu_s2pro(args) -> dict:
    """Forward + backward of the s2pro slow model at bf16 on the first GPU: seconds per step and MFU."""
    if not torch.cuda.is_available():
        return {"run": False, "reason": "torch.cuda.is_available() is False"}
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.gpu_peak_tflops
    if peak is None and any(chip in name for chip in ("H100", "H200")):
        peak = H100_H200_BF16_DENSE_TFLOPS
    row = {"run": True, "device": name}
    return row | bench_slow_model(s2pro(), device, args, peak)


def bench_slow_model(cfg: DualARConfig, device: torch.device, args, peak: float | None) -> dict:
    """Time forward, slow cross-entropy and backward of ``cfg``'s slow model on ``device``."""
    torch.manual_seed(args.seed)
    with device:
        model = DualAR(cfg)  # fp32, the DualAR init; the fast model takes no part below
    if args.gpu_dtype == "bf16":
        model = model.to(torch.bfloat16)
    if args.gpu_checkpointing:
        checkpoint_blocks(model.slow.layers, model.fast.layers)
    model.train()
    batch = random_frame_batch(cfg, args.gpu_batch, args.gpu_len, device, args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu_dtype == "bf16-mixed")
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> Tensor:
        with autocast:
            out = model(batch["inputs"], batch["positions"], batch["segment_ids"])
            targets = batch["labels"][:, 0]  # the slow cross-entropy, as dual_ar_loss computes it
            loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.gpu_warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(args.gpu_steps):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    flops = train_flops(cfg, args.gpu_batch, args.gpu_len, 0)["slow"]
    median = statistics.median(times)
    row = {
        "model": "slow transformer (random weights): forward + slow cross-entropy + backward, no optimizer",
        "dtype": args.gpu_dtype,
        "activation_checkpointing": args.gpu_checkpointing,
        "batch": args.gpu_batch,
        "seq_len": args.gpu_len,
        "params_slow": sum(p.numel() for p in model.slow.parameters()),
        "matmul_params_slow": matmul_params(cfg)["slow"],
        "tflop_per_step": round(flops / 1e12, 4),
        "warmup_steps": args.gpu_warmup,
        "seconds_per_step_median": round(median, 4),
        "step_seconds": [round(t, 4) for t in times],
        "tokens_per_s": round(args.gpu_batch * args.gpu_len / median, 1),
        "achieved_tflops": round(flops / median / 1e12, 3),
        "peak_tflops": peak,
        "last_loss": round(float(loss), 4),
    }
    if cuda:
        row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if peak:
        row["mfu"] = round(flops / median / (peak * 1e12), 4)
    return row


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presets", nargs="*", default=["tiny", "small"], choices=sorted(PRESETS))
    parser.add_argument("--batches", type=int, default=4, help="distinct batches the DataLoader cycles")
    parser.add_argument("--tiny-batch", type=int, default=4)
    parser.add_argument("--tiny-len", type=int, default=512)
    parser.add_argument("--tiny-warmup", type=int, default=5)
    parser.add_argument("--tiny-steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--tiny-rounds", type=int, default=2)
    parser.add_argument("--small-batch", type=int, default=1)
    parser.add_argument("--small-len", type=int, default=256)
    parser.add_argument("--small-warmup", type=int, default=1)
    parser.add_argument("--small-steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--small-rounds", type=int, default=2)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="CPU peak, for an MFU of the CPU rows"
    )
    parser.add_argument("--gpu-peak-tflops", type=float, default=None, help="default 989 on H100/H200")
    parser.add_argument("--gpu-dtype", choices=["bf16-mixed", "bf16"], default="bf16-mixed")
    parser.add_argument("--gpu-checkpointing", action="store_true")
    parser.add_argument("--gpu-batch", type=int, default=1)
    parser.add_argument("--gpu-len", type=int, default=2048)
    parser.add_argument("--gpu-warmup", type=int, default=3)
    parser.add_argument("--gpu-steps", type=int, default=10)
    args = parser.parse_args()
    for name in ("tiny", "small"):
        if min(getattr(args, f"{name}_warmup"), getattr(args, f"{name}_rounds")) < 1:
            parser.error(f"--{name}-warmup and --{name}-rounds must be at least 1")
        if getattr(args, f"{name}_steps") < 1:
            parser.error(f"--{name}-steps must be at least 1")
    if args.gpu_warmup < 1 or args.gpu_steps < 1:
        parser.error("--gpu-warmup and --gpu-steps must be at least 1")

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    started = time.perf_counter()
    import lightning

    report: dict = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "seed": args.seed,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "flops_per_token": "6 * N + 12 * L * (H * Dh) * T_ctx (Kaplan et al. 2020 6N; PaLM attention term)",
    }
    sizes = {
        "tiny": (args.tiny_batch, args.tiny_len, args.tiny_warmup, args.tiny_steps, args.tiny_rounds),
        "small": (args.small_batch, args.small_len, args.small_warmup, args.small_steps, args.small_rounds),
    }
    report["cpu_presets"] = {}
    for name in args.presets:
        report["cpu_presets"][name] = row = bench_preset(name, args, *sizes[name])
        summary = {k: v for k, v in row.items() if k not in ("ours_lightning", "plain_pytorch")}
        print(f"{name}: {json.dumps(summary)}", flush=True)
        for path in ("ours_lightning", "plain_pytorch"):
            print(f"  {path}: {json.dumps({k: v for k, v in row[path].items() if k != 'step_seconds'})}")
    report["gpu_s2pro"] = bench_gpu_s2pro(args)
    print(f"gpu_s2pro: {json.dumps(report['gpu_s2pro'])}")
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
