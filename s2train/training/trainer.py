"""The one Lightning ``Trainer`` builder every training stage uses (codec, pretrain; SFT, fine-tuning and
GRPO later): strategy, precision, loggers, checkpoints, resume, activation checkpointing, threads.

A stage module only defines its LightningModule and its data; this file decides how they are trained:

- **Strategy**: one device trains plainly; several devices (or any ``strategy`` other than ddp) get
  ``DDPStrategy`` or ``DeepSpeedStrategy`` (ZeRO-2 / ZeRO-3, optional CPU offload) from the ``strategy``
  group.
- **Precision** ``auto``: ``bf16-mixed`` on a GPU, ``32-true`` on a CPU; any Lightning precision otherwise.
- **Loggers**: CSV under ``logs/``; wandb (offline unless ``WANDB_MODE`` says otherwise) with a run id made
  of the experiment, stage and seed, so a requeued job continues its wandb run.
- **Checkpoints** every ``checkpoint_every`` steps as ``checkpoints/step-NNNNNN.ckpt`` and ``last.ckpt``.
- **Resume** from the newest of ``checkpoints/last.ckpt`` and the ``hpc_ckpt_*.ckpt`` Lightning writes when
  SLURM signals pre-emption (``SIGUSR1``) before a requeue. Under DeepSpeed a checkpoint is a directory
  (``latest`` names a tag folder holding ``*model_states.pt``); both forms resume.
- **Export** under ZeRO-3: parameters are partitioned across ranks, so the weights and parameter counts of
  a finished run are read inside ``deepspeed.zero.GatheredParameters`` (``gathered_state_dict``,
  ``parameter_count``).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from s2train.checks import check


@dataclass
class StrategyConfig:
    """How training is distributed (the ``strategy`` group: ddp, deepspeed_zero2, deepspeed_zero3)."""

    name: str = "ddp"  # ddp | deepspeed_zero2 | deepspeed_zero3
    process_group_backend: str | None = None  # None: nccl on GPU, gloo on CPU
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory
    offload_parameters: bool = False  # DeepSpeed ZeRO-3: parameters in CPU memory

    def __post_init__(self) -> None:
        known = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
        check(self.name in known, f"strategy.name must be one of {', '.join(known)}, not {self.name!r}")
        check(
            self.process_group_backend in (None, "nccl", "gloo"),
            f"strategy.process_group_backend must be nccl or gloo, not {self.process_group_backend!r}",
        )


@dataclass(frozen=True)
class TrainerSpec:
    """What a stage asks of the trainer; each stage fills it from its own config section."""

    run_dir: Path
    run_id: str  # experiment-stage-seed: names the wandb run, the same after a requeue
    max_steps: int  # Lightning steps (optimizer steps; a GAN stage counts each optimizer)
    checkpoint_every: int  # in Lightning steps
    log_every: int
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: StrategyConfig | None = None  # None: plain, one device
    precision: str = "auto"
    grad_clip: float | None = None  # Lightning's gradient clipping (automatic optimization only)
    progress: bool = True
    wandb: bool = False
    wandb_project: str = "s2train"
    threads: int = 0  # torch intra-op threads on a CPU; 0 leaves torch's default


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on a GPU, 32-true on a CPU; anything else as given."""
    if precision != "auto":
        return precision
    on_gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def build_strategy(s: StrategyConfig):
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=s.process_group_backend)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"strategy={s.name} needs DeepSpeed on GPU nodes: pip install -e .[deepspeed]")
    return DeepSpeedStrategy(
        stage=3 if s.name == "deepspeed_zero3" else 2,
        offload_optimizer=s.offload_optimizer,
        offload_parameters=s.offload_parameters,
        process_group_backend=s.process_group_backend,
    )


def build_loggers(spec: TrainerSpec) -> list:
    loggers: list = [CSVLogger(save_dir=str(spec.run_dir), name="logs")]
    if spec.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ModuleNotFoundError as error:
            raise ValueError("wandb=true needs wandb: pip install wandb") from error
        loggers.append(
            WandbLogger(
                project=spec.wandb_project,
                name=spec.run_id.rsplit("-", 1)[0],
                save_dir=str(spec.run_dir),
                id=spec.run_id,  # the same id after a requeue: the run continues
                resume="allow",
            )
        )
    return loggers


def build_trainer(spec: TrainerSpec, **trainer_kwargs: Any) -> L.Trainer:
    """The ``L.Trainer`` of a stage; ``trainer_kwargs`` are passed on (e.g. ``use_distributed_sampler``)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    distributed = spec.devices * spec.num_nodes > 1 or (
        spec.strategy is not None and spec.strategy.name != "ddp"
    )
    checkpoints = ModelCheckpoint(
        dirpath=spec.run_dir / "checkpoints",
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=spec.checkpoint_every,
        save_top_k=-1,
        save_last=True,
    )
    return L.Trainer(
        accelerator=spec.accelerator,
        devices=spec.devices,
        num_nodes=spec.num_nodes,
        strategy=build_strategy(spec.strategy or StrategyConfig()) if distributed else "auto",
        precision=resolve_precision(spec.precision, spec.accelerator),
        max_steps=spec.max_steps,
        gradient_clip_val=spec.grad_clip or None,
        log_every_n_steps=spec.log_every,
        logger=build_loggers(spec),
        callbacks=[checkpoints],
        enable_progress_bar=spec.progress,
        enable_model_summary=False,
        default_root_dir=str(spec.run_dir),
        **trainer_kwargs,
    )


# ----------------------------------------------------------------------------------------- resume


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` (a file, or a DeepSpeed directory), the periodic
    ``checkpoints/step-*.ckpt`` (Lightning writes one just before ``last.ckpt``: a kill between the two
    loses nothing) and the ``hpc_ckpt_*.ckpt`` Lightning writes on SLURM's pre-emption signal, or None."""
    folder = Path(run_dir) / "checkpoints"
    candidates = [folder / "last.ckpt", *folder.glob("step-*.ckpt"), *Path(run_dir).glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.exists()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def deepspeed_state_file(folder: Path) -> Path:
    """The file of a DeepSpeed checkpoint directory that holds Lightning's state: ``<tag>/*model_states.pt``
    (``latest`` names the tag; Lightning's is ``checkpoint``), rank 0's under ZeRO-3."""
    tag_file = folder / "latest"
    tag = tag_file.read_text().strip() if tag_file.is_file() else "checkpoint"
    states = sorted((folder / tag).glob("*model_states.pt"))
    if not states:
        raise ValueError(
            f"{folder} is not a checkpoint: no {tag}/*model_states.pt (DeepSpeed's layout) in it"
        )
    return states[0]


def checkpoint_step(path: Path) -> int:
    """Lightning's ``global_step`` in a checkpoint file or DeepSpeed checkpoint directory, read with
    ``weights_only=True`` and memory-mapped, so a large checkpoint's tensors are not read for it."""
    path = Path(path)
    file = deepspeed_state_file(path) if path.is_dir() else path
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=not path.is_dir())
    except pickle.UnpicklingError as error:  # DeepSpeed may store objects that weights_only refuses
        warnings.warn(f"could not read the step of {file} safely ({error}); counting from 0", stacklevel=2)
        return 0
    return int(state["global_step"])


@dataclass(frozen=True)
class Resume:
    """Where a stage continues from: the checkpoint (None: from scratch) and its Lightning step."""

    path: Path | None
    step: int


def resume_point(run_dir: Path) -> Resume:
    """The newest checkpoint of ``run_dir`` (``latest_checkpoint``) and its step, read once."""
    path = latest_checkpoint(run_dir)
    return Resume(path, checkpoint_step(path) if path is not None else 0)


def fit(trainer: L.Trainer, module: L.LightningModule, resume: Resume, **data: Any) -> float:
    """``trainer.fit`` from ``resume``, then ``last.ckpt`` of the final step whatever ``checkpoint_every``
    says (every rank takes part); returns the seconds it trained. ``data``: ``train_dataloaders`` or
    ``datamodule``. A run stopped by SIGTERM exits with status 143, not 0: it did not finish (it resumes
    from its last checkpoint when started again)."""
    started = time.perf_counter()
    ckpt_path = str(resume.path) if resume.path is not None else None
    try:
        trainer.fit(module, **data, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as stop:  # Lightning's is a SystemExit with status 0: a scheduler saw success
        raise SystemExit(128 + signal.SIGTERM) from stop
    train_s = time.perf_counter() - started
    trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    return train_s


# ------------------------------------------------------------------------------------------ export


def _zero3(trainer: L.Trainer) -> bool:
    return bool(getattr(trainer.strategy, "zero_stage_3", False))


def gathered_state_dict(trainer: L.Trainer, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of ``model`` on CPU on rank 0 (None on the other ranks). Under ZeRO-3 every rank
    must call it: the partitioned parameters are gathered first."""
    if _zero3(trainer):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if not trainer.is_global_zero:
                return None
            # copies: the gathered tensors are partitioned again when the block ends
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if not trainer.is_global_zero:
        return None
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def parameter_count(parameters: Iterable[nn.Parameter]) -> int:
    """Elements of ``parameters``; a ZeRO-3 parameter counts its full size (``ds_numel``), not its shard."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in parameters)


def checkpoint_blocks(*stacks: nn.ModuleList) -> None:
    """Activation checkpointing from outside the model: every block of ``stacks`` is recomputed in the
    backward pass instead of keeping its activations."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for layers in stacks:
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
