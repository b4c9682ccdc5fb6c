"""``stage=sft``: caption and instruction tuning of a Dual-AR model, on the shared trainer.

It starts from a trained model, ``sft.init``: a pretrain run directory (the default,
``run_root/name/pretrain``), any run that exported ``model.safetensors`` + ``model.json`` (an earlier SFT
or a fine-tune), or a released S2 Pro folder (through ``compat/``, as a trainable float32 model whose
tokenizer comes with it). It trains on the token data of pretraining, but every utterance becomes an
example of a kind drawn by ``sft.mix`` (``s2train.training.lm_data``, "Examples"): voice cloning from a
reference of the same speaker, the captioner's caption in the system turn, the captioner's inline tags in
the text, dialogue between two speakers with ``<|speaker:i|>`` switches, and plain TTS. ``sft.train``
holds its own optimisation settings (a lower learning rate than pretraining), so one pipeline runs both.

Everything around the step is pretraining's (``pretrain_stage.train_dual_ar``): checkpoints and exact
resume (SLURM's pre-emption checkpoint included), ``losses.jsonl``, ``loss_curve.png``, CSV and wandb
logs, and the exported ``model.safetensors`` + ``model.json``, which ``stage=synthesize`` and
``stage=eval`` open as they open a pretrained model.

    python -m s2train stage=sft name=demo sft.train.max_steps=300
    python -m s2train stage=sft name=mine sft.init=/models/s2-pro lm_data.input=runs/mine/tokenize \\
        text.n_semantic=4096 sft.train.batch_size=4
    sbatch --nodes=2 slurm/sft.sbatch name=mycorpus sft.init=runs/mycorpus/pretrain
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from s2train.checkpoints import open_dual_ar
from s2train.models.dual_ar import DualAR
from s2train.runs import stage_input
from s2train.text.tokenizer import TextTokenizer, model_tokenizer
from s2train.training.lm_data import ExampleMix
from s2train.training.lm_module import LMTrainConfig
from s2train.training.pretrain_stage import codebook_sizes, fit_model_to_data, token_input, train_dual_ar

if TYPE_CHECKING:
    from s2train.config import S2Config


def _sft_mix() -> ExampleMix:
    return ExampleMix(plain=0.2, cloning=0.35, captioned=0.15, tagged=0.15, dialogue=0.15)


def _sft_train() -> LMTrainConfig:
    return LMTrainConfig(max_steps=1000, lr=1e-4, warmup_steps=50, min_lr_ratio=0.1)


@dataclass
class SFTConfig:
    """``stage=sft`` (``s2train.training.sft_stage``)."""

    init: str | None = None  # a run dir with model.safetensors + model.json, or a released S2 Pro folder;
    # None: run_root/name/pretrain
    mix: ExampleMix = field(default_factory=_sft_mix)  # weights of the example kinds
    train: LMTrainConfig = field(default_factory=_sft_train)  # optimisation, checkpoints, logging


def open_trainable(
    cfg: S2Config, init: str | Path, token_data: str | Path, key: str
) -> tuple[DualAR, TextTokenizer]:
    """The model at ``init`` (any ``open_dual_ar`` format) in float32 with its tokenizer, checked to fit
    the token data at ``token_data`` (semantic ids, codebooks); ``key`` names ``init`` in errors."""
    sizes = codebook_sizes(str(token_data), cfg.lm_data.codebooks)
    model, release = open_dual_ar(
        init, dtype=torch.float32, residual_codebook_size=max(sizes[1:]) if sizes else None, key=key
    )
    tokenizer = model_tokenizer(release, cfg.text)
    _, changed = fit_model_to_data(model.config, tokenizer, sizes)
    changed.pop("vocab_size", None)  # a model's table may be padded further than the rounding (S2 Pro's is)
    if changed:
        differences = ", ".join(f"{k}: model {a}, data {b}" for k, (a, b) in changed.items())
        raise ValueError(
            f"{key}={init} does not fit this token data and tokenizer ({differences}); train on the tokens "
            "of the codec and the tokenizer the model was trained with"
        )
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but {key}'s model only {model.config.vocab_size}"
        )
    return model, tokenizer


def run(cfg: S2Config) -> dict | None:
    init = stage_input(cfg, "pretrain", cfg.sft.init)
    model, tokenizer = open_trainable(cfg, init, token_input(cfg), "sft.init")
    data = dataclasses.replace(cfg.lm_data, mix=cfg.sft.mix)
    state = model.state_dict()  # the module builds its own model and loads these into it
    result = train_dual_ar(cfg, model.config, tokenizer, cfg.sft.train, data, init_state=state)
    if result is not None:
        result["init"] = str(init)
    return result
