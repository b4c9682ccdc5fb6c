"""``stage=pretrain``: Dual-AR next-token training on token shards, with Lightning, on one CPU or many GPUs.

Every utterance of the token shards (``stage=tokenize``) becomes a prompt in S2's chat format
(``s2train.text.prompt``); utterances of one speaker are packed into sequences of up to
``lm_data.max_len`` positions and streamed, split across ranks and workers, with a resumable cursor
(``s2train.training.lm_data``). ``DualARModule`` trains the slow and the fast model on them.

The model is the ``model`` group's shape; when training from scratch its vocabulary, semantic token ids
and codebook sizes are taken from the tokenizer and the token shards (printed when they change the
preset). The run directory (stable, so a requeued job finds it) gets ``checkpoints/`` (every
``train.checkpoint_every`` steps and ``last.ckpt``; a rerun resumes from the newest checkpoint, including
the one Lightning writes on SLURM's ``SIGUSR1`` before a requeue), ``losses.jsonl`` and
``loss_curve.png``, CSV logs under ``logs/`` (and wandb, offline unless configured, with a run id that
survives requeue), and ``model.safetensors`` + ``model.json`` at the end.

    python -m s2train stage=pretrain name=demo train.max_steps=200                      # CPU, tiny
    python -m s2train stage=pretrain name=demo train.devices=2 train.accelerator=cpu    # 2-process gloo DDP
    python -m s2train stage=pretrain name=mycorpus model=small text.kind=hf text.path=/models/s2-pro \\
        text.n_semantic=4096 train.batch_size=16 lm_data.max_len=4096 train.max_steps=200000   # one GPU
    sbatch --nodes=4 slurm/pretrain.sbatch name=mycorpus model=s2pro strategy=deepspeed_zero3 ...
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.runs import checkpoint_step
from s2train.text.tokenizer import TextTokenizer, load_tokenizer
from s2train.training.lm_data import Collate, TokenStream, open_token_source
from s2train.training.lm_module import DualARModule, plot_losses, read_losses

if TYPE_CHECKING:
    from s2train.config import S2Config


def token_input(cfg: S2Config) -> str:
    """The token data: ``lm_data.input`` or this experiment's tokenize run."""
    return cfg.lm_data.input or str(Path(cfg.run_root) / cfg.name / "tokenize")


def codebook_sizes(spec: str) -> list[int] | None:
    """Entries per codebook, from the ``stats.json`` a tokenize run writes (None for other inputs)."""
    stats = Path(spec) / "stats.json"
    if not stats.is_file():
        return None
    sizes = json.loads(stats.read_text()).get("codebook_sizes")
    return [int(s) for s in sizes] if sizes else None


def fit_model_to_data(
    model: DualARConfig, tokenizer: TextTokenizer, sizes: list[int] | None
) -> tuple[DualARConfig, dict]:
    """The model preset with the vocabulary, semantic ids and codebook shape of this data.

    The vocabulary is the tokenizer's, rounded up to a multiple of 64 (padding rows, as S2 Pro has).
    Returns the new config and the fields it changed, ``{name: (preset, new)}``.
    """
    n_semantic = tokenizer.n_semantic
    if sizes is not None and sizes[0] != n_semantic:
        raise ValueError(
            f"the tokenizer has {n_semantic} semantic tokens but the token shards' semantic codebook has "
            f"{sizes[0]} entries: set text.n_semantic={sizes[0]} (or use the tokenizer of this codec)"
        )
    wanted = {
        "vocab_size": -(-tokenizer.vocab_size // 64) * 64,
        "semantic_begin_id": tokenizer.semantic_begin,
        "semantic_end_id": tokenizer.semantic_end,
        "codebook_size": n_semantic,
    }
    if sizes is not None:
        wanted["num_codebooks"] = len(sizes)
        wanted["residual_codebook_size"] = max(sizes[1:])
    else:
        wanted["residual_codebook_size"] = min(model.residual_codebook_size, n_semantic)
    changed = {k: (getattr(model, k), v) for k, v in wanted.items() if getattr(model, k) != v}
    return dataclasses.replace(model, **wanted), changed


class LMDataModule(L.LightningDataModule):
    """The token stream of this rank; it is built when the Trainer knows the rank and world size."""

    def __init__(self, cfg: S2Config, tokenizer: TextTokenizer, num_codebooks: int, module: DualARModule):
        super().__init__()
        self.cfg, self.tokenizer, self.num_codebooks, self.module = cfg, tokenizer, num_codebooks, module
        self.stream: TokenStream | None = None

    def train_dataloader(self) -> DataLoader:
        cfg = self.cfg
        self.stream = TokenStream(
            open_token_source(token_input(cfg), cfg.lm_data.hf_rows_per_unit),
            self.tokenizer,
            self.num_codebooks,
            cfg.lm_data,
            seed=cfg.seed,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            system_turn=cfg.text.system_turn,
        )
        if self.module.pending_stream_state is not None:  # a resumed run continues the data order
            self.stream.load_state_dict(self.module.pending_stream_state)
        workers = cfg.train.num_workers
        return DataLoader(
            self.stream,
            batch_size=cfg.train.batch_size,
            num_workers=workers,
            collate_fn=Collate(self.tokenizer.token_id("<|pad|>")),
            persistent_workers=workers > 0,
        )


def _strategy(cfg: S2Config):
    s = cfg.strategy
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=s.process_group_backend)
    import importlib.util

    from lightning.pytorch.strategies import DeepSpeedStrategy

    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"strategy={s.name} needs DeepSpeed on GPU nodes: pip install -e .[deepspeed]")
    return DeepSpeedStrategy(
        stage=3 if s.name == "deepspeed_zero3" else 2,
        offload_optimizer=s.offload_optimizer,
        offload_parameters=s.offload_parameters,
        process_group_backend=s.process_group_backend,
    )


def _precision(cfg: S2Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    on_gpu = cfg.train.accelerator == "gpu" or (cfg.train.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def _loggers(cfg: S2Config, run_dir: Path) -> list:
    loggers = [CSVLogger(save_dir=str(run_dir), name="logs")]
    if cfg.train.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ModuleNotFoundError as error:
            raise ValueError("train.wandb=true needs wandb: pip install wandb") from error
        loggers.append(
            WandbLogger(
                project=cfg.train.wandb_project,
                name=f"{cfg.name}-{cfg.stage}",
                save_dir=str(run_dir),
                id=f"{cfg.name}-{cfg.stage}-{cfg.seed}",  # the same id after a requeue: the run continues
                resume="allow",
            )
        )
    return loggers


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and the ``hpc_ckpt_*.ckpt`` Lightning writes on SLURM's
    pre-emption signal, or None."""
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.exists()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def save_model(model: DualAR, folder: Path) -> None:
    """``model.safetensors`` (our key names) and ``model.json`` (its ``DualARConfig``)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.json").write_text(json.dumps(dataclasses.asdict(model.config), indent=1))


def run(cfg: S2Config) -> dict | None:
    t = cfg.train
    run_dir = Path(cfg.run_dir)
    source = token_input(cfg)
    tokenizer = load_tokenizer(cfg.text)
    model_cfg, changed = fit_model_to_data(cfg.model, tokenizer, codebook_sizes(source))
    for name, (preset, new) in changed.items():
        print(f"model.{name}: {preset} -> {new} (from the tokenizer and the token shards)")
    if t.threads:
        torch.set_num_threads(t.threads)

    torch.manual_seed(cfg.seed)
    module = DualARModule(model_cfg, t, run_dir)
    data = LMDataModule(cfg, tokenizer, model_cfg.num_codebooks, module)
    resume = latest_checkpoint(run_dir)
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every,
        save_top_k=-1,
        save_last=True,
    )
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(cfg) if t.devices * t.num_nodes > 1 or cfg.strategy.name != "ddp" else "auto",
        precision=_precision(cfg),
        max_steps=t.max_steps,
        gradient_clip_val=t.grad_clip or None,
        log_every_n_steps=t.log_every,
        logger=_loggers(cfg, run_dir),
        callbacks=[checkpoints],
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # the token stream splits the data itself
    )
    started = time.perf_counter()
    step_before = checkpoint_step(resume) if resume is not None else 0
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=True)
    train_s = time.perf_counter() - started
    trainer.save_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", weights_only=False
    )  # every rank takes part
    if not trainer.is_global_zero:
        return None  # rank 0 reports

    rows = read_losses(module.loss_file)
    plot_losses(rows, run_dir / "loss_curve.png", f"{cfg.name}: {cfg.stage}")
    save_model(module.model, run_dir)
    slow = sum(p.numel() for p in module.model.slow.parameters())
    fast = sum(p.numel() for p in module.model.fast.parameters())
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return {
        "steps": trainer.global_step,
        "resumed_from_step": step_before,
        "params_slow_M": round(slow / 1e6, 3),
        "params_fast_M": round(fast / 1e6, 3),
        "first_loss": round(first.get("loss/total", float("nan")), 4),
        "final_loss": round(last.get("loss/total", float("nan")), 4),
        "final_slow_loss": round(last.get("loss/slow", float("nan")), 4),
        "final_fast_loss": round(last.get("loss/fast", float("nan")), 4),
        "train_wall_s": round(train_s, 2),
        "steps_per_s": round((trainer.global_step - step_before) / train_s, 3),
        "model_changes": {k: list(v) for k, v in changed.items()},
        "loss_curve": str(run_dir / "loss_curve.png"),
        "model": str(run_dir / "model.safetensors"),
    }
