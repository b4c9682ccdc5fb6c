"""The registry of stages: ``stage=<name>`` -> the module whose ``run(cfg) -> dict`` does the work.

Each stage writes only under its own run directory and returns its headline figures (a distributed
stage returns None on every rank but rank 0).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

STAGES: dict[str, str] = {
    "demo_corpus": "data_pipeline.demo_corpus",
    "clean": "data_pipeline.clean",
    "tokenize": "data_pipeline.tokenize",
    "codec": "s2train.training.codec_stage",
    "pretrain": "s2train.training.pretrain_stage",
    "sft": "s2train.training.sft_stage",
    "finetune": "s2train.training.finetune_stage",
    "preference": "s2train.rl.preference",
    "grpo": "s2train.rl.grpo_stage",
    "synthesize": "s2train.inference.synthesize_stage",
    "serve": "s2train.serving.serve_stage",
    "eval": "eval.stage",
    "emergent": "eval.emergent",
    "demo_report": "eval.demo_report",
    "pipeline": "s2train.cli",
}


def stage_runner(name: str) -> Callable[[Any], dict]:
    if name not in STAGES:
        known = ", ".join(sorted(STAGES))
        raise ValueError(f"unknown stage {name!r}; the known stages are: {known}")
    return importlib.import_module(STAGES[name]).run
