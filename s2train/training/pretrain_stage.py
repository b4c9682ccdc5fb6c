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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch.utils.data import DataLoader

from s2train.checkpoints import save_dual_ar
from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.runs import stage_input
from s2train.text.tokenizer import TextTokenizer, load_tokenizer
from s2train.training.lm_data import Collate, LMDataConfig, TarShards, TokenStream, open_token_source
from s2train.training.lm_module import DualARModule, LMTrainConfig, plot_losses, read_losses
from s2train.training.trainer import (
    TrainerSpec,
    build_trainer,
    fit,
    gathered_state_dict,
    parameter_count,
    resume_point,
)

if TYPE_CHECKING:
    from s2train.config import S2Config


def token_input(cfg: S2Config) -> str:
    """The token data: ``lm_data.input`` or this experiment's tokenize run."""
    return str(stage_input(cfg, "tokenize", cfg.lm_data.input))


def codebook_sizes(spec: str, codebooks: int = 0) -> list[int] | None:
    """Entries per codebook of the first ``codebooks`` (0: all) codebooks, from the ``stats.json`` a
    tokenize run writes (None for other inputs)."""
    stats = Path(spec) / "stats.json"
    if not stats.is_file():
        return None
    sizes = [int(s) for s in json.loads(stats.read_text()).get("codebook_sizes") or []]
    if codebooks > len(sizes):
        raise ValueError(
            f"lm_data.codebooks={codebooks} but the token data in {spec} has {len(sizes)} codebooks"
        )
    return (sizes[:codebooks] if codebooks else sizes) or None


def fit_model_to_data(
    model: DualARConfig, tokenizer: TextTokenizer, sizes: list[int] | None, codebooks: int = 0
) -> tuple[DualARConfig, dict]:
    """The model preset with the vocabulary, semantic ids and codebook shape of this data.

    ``codebooks`` (``lm_data.codebooks``) sets the number of codebooks where the data does not say its
    sizes (a saved dataset); token shards' ``sizes`` are already cut to it by ``codebook_sizes``.

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
        if codebooks:
            wanted["num_codebooks"] = codebooks
    changed = {k: (getattr(model, k), v) for k, v in wanted.items() if getattr(model, k) != v}
    return dataclasses.replace(model, **wanted), changed


class LMDataModule(L.LightningDataModule):
    """The token stream of this rank; it is built when the Trainer knows the rank and world size."""

    def __init__(
        self,
        cfg: S2Config,
        tokenizer: TextTokenizer,
        num_codebooks: int,
        module: DualARModule,
        data: LMDataConfig,
        train: LMTrainConfig,
        token_data: str | list[Path] | None = None,
    ):
        super().__init__()
        self.cfg, self.tokenizer, self.num_codebooks, self.module = cfg, tokenizer, num_codebooks, module
        self.data, self.train = data, train
        self.token_data = token_data or token_input(cfg)
        self.stream: TokenStream | None = None

    def train_dataloader(self) -> DataLoader:
        cfg = self.cfg
        self.stream = TokenStream(
            TarShards(self.token_data)
            if isinstance(self.token_data, list)
            else open_token_source(self.token_data, self.data.hf_rows_per_unit),
            self.tokenizer,
            self.num_codebooks,
            self.data,
            seed=cfg.seed,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            system_turn=cfg.text.system_turn,
        )
        if self.module.pending_stream_state is not None:  # a resumed run continues the data order
            self.stream.load_state_dict(self.module.pending_stream_state)
        workers = self.train.num_workers
        return DataLoader(
            self.stream,
            batch_size=self.train.batch_size,
            num_workers=workers,
            collate_fn=Collate(self.tokenizer.token_id("<|pad|>")),
            persistent_workers=workers > 0,
        )


def train_dual_ar(
    cfg: S2Config,
    model_cfg: DualARConfig,
    tokenizer: TextTokenizer,
    t: LMTrainConfig,
    data: LMDataConfig,
    init_state: dict | None = None,
    adapt: Callable[[DualAR], None] | None = None,
    finish: Callable[[dict], dict] | None = None,
    token_data: str | list[Path] | None = None,
) -> dict | None:
    """Train the Dual-AR model on the token data (``token_data``: a spec or a list of token tars, a tar
    listed twice being read twice an epoch; default ``lm_data.input``) with the shared
    trainer and write the run directory: checkpoints, losses, the loss curve and the exported model.
    Pretraining starts from ``model_cfg``'s random initialisation, later stages from ``init_state``;
    ``adapt`` changes the built model (fine-tuning's LoRA layers) and ``finish`` turns its trained weights
    into the plain model to export (the adapter merged). Returns rank 0's figures."""
    run_dir = Path(cfg.run_dir)
    trainer = build_trainer(
        TrainerSpec(
            run_dir=run_dir,
            run_id=f"{cfg.name}-{cfg.stage}-{cfg.seed}",
            max_steps=t.max_steps,
            checkpoint_every=t.checkpoint_every,
            log_every=t.log_every,
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=cfg.strategy,
            precision=t.precision,
            grad_clip=t.grad_clip,
            progress=t.progress,
            wandb=t.wandb,
            wandb_project=t.wandb_project,
            threads=t.threads,
        ),
        use_distributed_sampler=False,  # the token stream splits the data itself
    )
    torch.manual_seed(cfg.seed)
    module = DualARModule(model_cfg, t, run_dir, init_state=init_state, adapt=adapt)
    datamodule = LMDataModule(cfg, tokenizer, model_cfg.num_codebooks, module, data, t, token_data)
    resume = resume_point(run_dir)
    train_s = fit(trainer, module, resume, datamodule=datamodule)
    state = gathered_state_dict(trainer, module.model)  # every rank takes part under ZeRO-3
    if not trainer.is_global_zero:
        return None  # rank 0 reports

    rows = read_losses(module.loss_file)
    plot_losses(rows, run_dir / "loss_curve.png", f"{cfg.name}: {cfg.stage}")
    save_dual_ar(model_cfg, finish(state) if finish is not None else state, run_dir, tokenizer)
    slow = parameter_count(module.model.slow.parameters())
    fast = parameter_count(module.model.fast.parameters())
    trainable = parameter_count(p for p in module.model.parameters() if p.requires_grad)
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    return {
        "steps": trainer.global_step,
        "resumed_from_step": resume.step,
        "params_slow_M": round(slow / 1e6, 3),
        "params_fast_M": round(fast / 1e6, 3),
        "params_trained_M": round(trainable / 1e6, 4),
        "first_loss": round(first.get("loss/total", float("nan")), 4),
        "final_loss": round(last.get("loss/total", float("nan")), 4),
        "final_slow_loss": round(last.get("loss/slow", float("nan")), 4),
        "final_fast_loss": round(last.get("loss/fast", float("nan")), 4),
        "train_wall_s": round(train_s, 2),
        "steps_per_s": round((trainer.global_step - resume.step) / train_s, 3),
        "loss_curve": str(run_dir / "loss_curve.png"),
        "model": str(run_dir / "model.safetensors"),
    }


def run(cfg: S2Config) -> dict | None:
    tokenizer = load_tokenizer(cfg.text)
    model_cfg, changed = fit_model_to_data(
        cfg.model, tokenizer, codebook_sizes(token_input(cfg), cfg.lm_data.codebooks), cfg.lm_data.codebooks
    )
    for name, (preset, new) in changed.items():
        print(f"model.{name}: {preset} -> {new} (from the tokenizer and the token shards)")
    result = train_dual_ar(cfg, model_cfg, tokenizer, cfg.train, cfg.lm_data)
    if result is not None:
        result["model_changes"] = {k: list(v) for k, v in changed.items()}
    return result
