"""The LightningModule every Dual-AR training stage shares: pretraining uses it as it is; SFT, fine-tuning
and GRPO change the batch and the loss, not the optimisation, checkpointing or logging around them.

Shape legend: B batch, R = 1 + K rows, K codebooks, T positions, V vocabulary, N fast rows.

A step: the slow model over the packed inputs (B, R, T) with their positions and segment ids; the fast
model teacher-forced on the N positions whose next token is semantic; ``dual_ar_loss`` (slow and fast
cross-entropy, weighted by ``train.loss_weights``, per-codebook losses and accuracies logged under the
same names). AdamW with weight decay on matrices only (no decay on vectors or embeddings), a linear
warm-up then a cosine to ``min_lr_ratio * lr``, gradient clipping by the Trainer.

Resume is exact: the checkpoint holds the model, the optimizer, the schedule and every rank's data-stream
cursor (gathered from all ranks when the checkpoint is written), and the loss of every step goes to
``losses.jsonl`` in the run directory, which a resumed run first cuts back to the checkpoint's step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from s2train.checks import check
from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.runs import read_appended
from s2train.training.dual_ar_loss import dual_ar_loss, select_fast_rows
from s2train.training.trainer import checkpoint_blocks


@dataclass
class LMTrainConfig:
    """Training the Dual-AR model (``stage=pretrain``; later stages share it): optimisation, schedule,
    precision, checkpoints and logging. The distribution strategy is the ``strategy`` group."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # packed sequences per device and step
    num_workers: int = 0  # dataloader worker processes per rank (each one a data reader)
    lr: float = 3e-4  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_steps: int = 100  # linear warm-up from 0, then cosine down to min_lr_ratio * lr at max_steps
    weight_decay: float = 0.1  # matrices only: vectors (norms, biases) and embeddings get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    loss_weights: dict[str, float] = field(default_factory=lambda: {"loss/slow": 1.0, "loss/fast": 1.0})
    include_c0: bool = True  # also train fast output 0 on c0, as S2 does
    # The share of residual input codes (codebooks 1.. of the slow model's input frames, never the labels)
    # replaced by random codes. At inference the slow model reads the fast model's samples, not the
    # codec's codes; without noise a small model trained on little data learns to read the exact
    # residuals and loses its way once the fast model's first sample differs.
    code_noise: float = 0.0
    # The share of the input frames whose semantic token (and c0) is replaced by a random one, labels
    # untouched: the slow model learns to find its way back after drawing a token the data did not have.
    semantic_noise: float = 0.0
    activation_checkpointing: bool = False  # recompute every transformer block in the backward pass
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: int = 1  # per node
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU; or any Lightning precision
    threads: int = 0  # torch intra-op threads on a CPU; 0 leaves torch's default
    checkpoint_every: int = 500  # Lightning checkpoint (and last.ckpt) every this many steps
    log_every: int = 10
    progress: bool = True  # a progress bar
    wandb: bool = False  # also log to Weights & Biases (offline unless WANDB_MODE is set)
    wandb_project: str = "s2train"

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "devices", "num_nodes", "checkpoint_every", "log_every"):
            check(getattr(self, name) >= 1, f"train.{name} must be at least 1, not {getattr(self, name)}")
        check(
            self.num_workers >= 0 and self.threads >= 0,
            "train.num_workers and train.threads cannot be negative",
        )
        check(self.lr > 0, "train.lr must be positive")
        for name in ("code_noise", "semantic_noise"):
            value = getattr(self, name)
            check(0 <= value < 1, f"train.{name} must be in [0, 1), not {value}")
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be between 0 and 1")
        check(0 <= self.warmup_steps < self.max_steps, "train.warmup_steps must be below train.max_steps")
        check(
            self.weight_decay >= 0 and self.grad_clip >= 0,
            "train.weight_decay and grad_clip cannot be negative",
        )
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas must be two values in [0, 1)",
        )
        unknown = set(self.loss_weights) - {"loss/slow", "loss/fast"}
        check(
            not unknown,
            f"train.loss_weights has unknown keys {sorted(unknown)}; the keys are loss/slow, loss/fast",
        )


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning-rate multiplier at ``step``: linear from 0 to 1 over ``warmup`` steps, then a cosine
    from 1 down to ``min_ratio`` at ``total``, flat after."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; vectors (norm weights, biases, Snake alphas) and embeddings do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def noisy_inputs(
    inputs: Tensor, cfg: DualARConfig, code_rate: float, semantic_rate: float, generator: torch.Generator
) -> Tensor:
    """inputs (B, R, T) with, at semantic positions, each residual code (rows 2..) replaced with
    probability ``code_rate`` by a code drawn uniformly from the residual codebook, and each frame's
    semantic token (row 0, with its c0 in row 1) with probability ``semantic_rate`` by a random semantic
    token. A new tensor; the noise is drawn on the CPU from ``generator`` whatever the device."""
    B, R, T = inputs.shape
    semantic = cfg.is_semantic(inputs[:, 0])  # (B, T)
    code_hit = (torch.rand(B, R - 2, T, generator=generator) < code_rate).to(inputs.device) & semantic[
        :, None
    ]
    codes = torch.randint(0, cfg.residual_codebook_size, (B, R - 2, T), generator=generator).to(inputs.device)
    token_hit = (torch.rand(B, T, generator=generator) < semantic_rate).to(inputs.device) & semantic
    c0 = torch.randint(0, cfg.codebook_size, (B, T), generator=generator).to(inputs.device)
    noisy = inputs.clone()
    noisy[:, 2:] = torch.where(code_hit, codes, inputs[:, 2:])
    noisy[:, 1] = torch.where(token_hit, c0, inputs[:, 1])
    noisy[:, 0] = torch.where(token_hit, c0 + cfg.semantic_begin_id, inputs[:, 0])
    return noisy


class DualARModule(L.LightningModule):
    def __init__(
        self,
        model_config: DualARConfig,
        train: LMTrainConfig,
        run_dir: Path | str,
        init_state: dict[str, Tensor] | None = None,
        adapt: Callable[[DualAR], None] | None = None,
    ):
        super().__init__()
        self.model_config = model_config
        self.init_state = init_state  # the weights to start from (SFT, fine-tuning); None: random
        self.adapt = adapt  # changes the model once built, before a checkpoint loads (LoRA, frozen parts)
        self.train_cfg = train
        self.run_dir = Path(run_dir)
        self.model: DualAR | None = None
        self.pending_stream_state: dict | None = None  # set on resume, taken by the data module

    def configure_model(self) -> None:
        """Build the model here, not in ``__init__``: under DeepSpeed ZeRO-3 Lightning calls this inside
        ``zero.Init``, so a 4B model is sharded as it is built."""
        if self.model is None:
            self.model = DualAR(self.model_config)
            if self.init_state is not None:  # a resumed run's checkpoint replaces these afterwards
                self.model.load_state_dict(self.init_state)
                self.init_state = None
            if self.adapt is not None:
                self.adapt(self.model)
            if self.train_cfg.activation_checkpointing:
                checkpoint_blocks(self.model.slow.layers, self.model.fast.layers)

    # ------------------------------------------------------------------------------------- the step

    def losses(self, batch: dict) -> dict[str, Tensor]:
        """``dual_ar_loss`` of a packed batch (``s2train.training.lm_data``'s contract)."""
        cfg = self.model_config
        labels = batch["labels"]  # (B, R, T)
        inputs = batch["inputs"]
        t = self.train_cfg
        if self.training and (t.code_noise > 0 or t.semantic_noise > 0):
            # Seeded by step and rank, so a resumed run draws the same noise as an unbroken one.
            generator = torch.Generator().manual_seed(self.global_step * 65_537 + self.global_rank)
            inputs = noisy_inputs(inputs, cfg, t.code_noise, t.semantic_noise, generator)
        out = self.model(inputs, batch["positions"], batch["segment_ids"])
        rows = select_fast_rows(labels, cfg.semantic_begin_id, cfg.semantic_end_id)
        fast_logits = self.model.fast_forward(out.hidden[rows.mask_BT], rows.codes_NK)  # (N, K, C)
        return dual_ar_loss(
            out.logits,
            fast_logits,
            labels,
            cfg.semantic_begin_id,
            cfg.semantic_end_id,
            weights=self.train_cfg.loss_weights,
            include_c0=self.train_cfg.include_c0,
        )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        stream = getattr(self.trainer.datamodule, "stream", None)
        if stream is not None:  # here, not in a callback, so a checkpoint after this step has seen it
            stream.advance(batch["stream"])
        logs = {name: value.detach() for name, value in losses.items()}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch["inputs"].shape[0])
        self.log("lr", self.lr_schedulers().get_last_lr()[0], on_step=True, on_epoch=False)
        if self.trainer.is_global_zero:
            self._append_loss(self.global_step + 1, logs)
        return losses["loss/total"]

    # --------------------------------------------------------------------------------- optimisation

    def configure_optimizers(self):
        t = self.train_cfg
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, t.weight_decay), lr=t.lr, betas=tuple(t.betas)
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------- checkpoints and logs

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store every rank's data-stream cursor (this hook runs on every rank)."""
        stream = getattr(self.trainer.datamodule, "stream", None)
        state = stream.state_dict() if stream is not None else None
        states = [state]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        checkpoint["token_streams"] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("token_streams") or [None]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if len(states) != world:
            raise ValueError(
                f"the checkpoint was written by {len(states)} ranks and this run has {world}: the data order "
                "cannot be resumed exactly; resume with the same number of devices and nodes"
            )
        self.pending_stream_state = states[rank]

    @property
    def loss_file(self) -> Path:
        return self.run_dir / "losses.jsonl"

    def on_train_start(self) -> None:
        """Cut ``losses.jsonl`` back to the steps this (possibly resumed) run starts after."""
        if not self.trainer.is_global_zero or not self.loss_file.exists():
            return
        kept = [row for row in read_losses(self.loss_file) if row["step"] <= self.global_step]
        self.loss_file.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def _append_loss(self, step: int, logs: dict[str, Tensor]) -> None:
        row = {"step": step, **{k: float(v) for k, v in logs.items() if k.startswith("loss/")}}
        with self.loss_file.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_losses(path: Path) -> list[dict]:
    """The rows of a ``losses.jsonl``, in step order; a last line cut short by a kill is left out."""
    return read_appended(path)


def plot_losses(
    rows: list[dict],
    out: Path,
    title: str,
    names: tuple[str, ...] = ("loss/total", "loss/slow", "loss/fast"),
    ylabel: str = "cross-entropy (nats)",
) -> None:
    """``names`` (default ``loss/total``, ``loss/slow`` and ``loss/fast``) against the step, as a .png;
    a name missing from a row is a gap in its line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for name in names:
        ax.plot(steps, [r.get(name, float("nan")) for r in rows], label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
