"""The one trainer builder: resume from ours or SLURM's pre-emption checkpoint in both training stages, the
step of a DeepSpeed checkpoint directory, ``auto`` precision, ZeRO-3 aware parameter counts and export."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from s2train.training.trainer import (
    checkpoint_step,
    deepspeed_state_file,
    latest_checkpoint,
    parameter_count,
    resolve_precision,
)
from tests.conftest import run_cli

PRETRAIN = [
    "stage=pretrain",
    "text.n_semantic=64",
    "lm_data.max_len=256",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.threads=1",
    "train.progress=false",
]
CODEC = [
    "stage=codec",
    "codec_train.warmup_steps=1",
    "codec_train.batch_size=2",
    "codec_train.threads=1",
    "codec_train.heldout_items=1",
]


def _preempted(run_dir: Path) -> None:
    """What a pre-empted SLURM job leaves: Lightning's ``hpc_ckpt_1.ckpt`` in the run directory, written
    after (so newer than) the last regular checkpoint, which is older here."""
    checkpoints = run_dir / "checkpoints"
    shutil.copy(checkpoints / "last.ckpt", run_dir / "hpc_ckpt_1.ckpt")
    for ckpt in checkpoints.glob("*.ckpt"):  # the regular checkpoints are from before the signal
        ckpt.unlink()


@pytest.mark.parametrize("stage", ["pretrain", "codec"])
def test_both_stages_resume_from_slurms_preemption_checkpoint(
    stage, tiny_token_run, tiny_clean_run, tmp_path
):
    run_dir = tmp_path / stage
    if stage == "pretrain":
        common = [*PRETRAIN, f"lm_data.input={tiny_token_run}", f"run_dir={run_dir}"]
        steps, more = "train.max_steps={}", "train.checkpoint_every=100"
    else:
        common = [*CODEC, f"codec_train.input={tiny_clean_run}", f"run_dir={run_dir}"]
        steps, more = "codec_train.max_steps={}", "codec_train.checkpoint_every=100"
    run_cli(*common, steps.format(3), more)
    _preempted(run_dir)
    assert latest_checkpoint(run_dir) == run_dir / "hpc_ckpt_1.ckpt"
    run_cli(*common, steps.format(5), more)
    results = json.loads((run_dir / "results.json").read_text())
    assert (results["resumed_from_step"], results["steps"]) == (3, 5)


def test_the_newest_of_last_periodic_and_hpc_checkpoints_is_resumed(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_2.ckpt"
    hpc.write_bytes(b"x")
    last.write_bytes(b"x")
    past = time.time() - 60
    os.utime(hpc, (past, past))
    assert latest_checkpoint(tmp_path) == last
    os.utime(last, (past - 60, past - 60))
    assert latest_checkpoint(tmp_path) == hpc
    # killed after the periodic checkpoint and before its last.ckpt: the periodic one is the newest
    periodic = tmp_path / "checkpoints" / "step-000004.ckpt"
    periodic.write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == periodic


def _deepspeed_dir(folder: Path, step: int, file: str, tag: str = "checkpoint") -> None:
    """The layout DeepSpeed writes for Lightning: ``latest`` names the tag folder, whose model-states file
    holds Lightning's state beside the module's weights."""
    (folder / tag).mkdir(parents=True)
    (folder / "latest").write_text(tag)
    torch.save({"module": {"w": torch.zeros(2)}, "global_step": step, "epoch": 0}, folder / tag / file)
    torch.save({"optimizer_state_dict": {}}, folder / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize(
    "file",
    ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"],
    ids=["zero2", "zero3"],
)
def test_a_deepspeed_checkpoint_directory_gives_its_step(file, tmp_path):
    folder = tmp_path / "checkpoints" / "last.ckpt"
    _deepspeed_dir(folder, 42, file)
    assert latest_checkpoint(tmp_path) == folder
    assert deepspeed_state_file(folder).name == file
    assert checkpoint_step(folder) == 42


def test_a_directory_that_is_no_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(ValueError, match="model_states"):
        checkpoint_step(tmp_path / "last.ckpt")


def test_auto_precision_and_zero3_parameter_counts():
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"
    layer = nn.Linear(4, 3)
    assert parameter_count(layer.parameters()) == 15
    layer.weight.ds_numel = 1200  # what ZeRO-3 attaches to a partitioned parameter (its data is empty)
    layer.weight.data = torch.empty(0)
    assert parameter_count(layer.parameters()) == 1203


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and deepspeed")
def test_zero3_pretraining_exports_the_whole_model(tiny_token_run, tmp_path):
    """Real DeepSpeed ZeRO-3 on one GPU: the exported weights are whole (gathered), not rank 0's shards."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from s2train.models.dual_ar import DualAR, DualARConfig

    run_dir = tmp_path / "zero3"
    run_cli(
        *PRETRAIN,
        f"lm_data.input={tiny_token_run}",
        f"run_dir={run_dir}",
        "train.max_steps=3",
        "train.accelerator=gpu",
        "strategy=deepspeed_zero3",
        "train.threads=0",
    )
    config = DualARConfig(**json.loads((run_dir / "model.json").read_text()))
    DualAR(config).load_state_dict(load_file(run_dir / "model.safetensors"))  # full shapes, strict
    results = json.loads((run_dir / "results.json").read_text())
    assert results["params_slow_M"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_dir()
    run_cli(
        *PRETRAIN,
        f"lm_data.input={tiny_token_run}",
        f"run_dir={run_dir}",
        "train.max_steps=4",
        "train.accelerator=gpu",
        "strategy=deepspeed_zero3",
    )
    assert json.loads((run_dir / "results.json").read_text())["resumed_from_step"] == 3


def test_a_run_stopped_by_sigterm_exits_non_zero(tiny_token_run, tmp_path):
    """A scheduler or wrapper must not take a stopped run for a finished one."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    run_dir = tmp_path / "stopped"
    args = [*PRETRAIN, f"lm_data.input={tiny_token_run}", f"run_dir={run_dir}", "train.max_steps=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "s2train", *args], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "losses.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    assert not (run_dir / "results.json").exists()
