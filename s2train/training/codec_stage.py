"""``stage=codec``: train the RVQ codec on a clean run's shards, with Lightning, on one device.

Random ``codec_train.segment_s`` crops of the clean utterances (resampled to the codec's rate) train the
codec on multi-scale mel, multi-resolution STFT and VQ losses, plus period and STFT discriminators with
``codec_train.adversarial=true``. The run directory gets ``checkpoints/`` (every ``checkpoint_every``
steps and ``last.ckpt``; a rerun resumes from ``last.ckpt``, so a requeued job continues), CSV logs in
``logs/version_*/metrics.csv``, previews of held-out utterances in ``previews/step-XXXXXX/`` and at the
end ``codec.pt``, which ``stage=tokenize tokenize.codec=<run_dir>/codec.pt`` reads.

    python -m s2train stage=codec name=demo codec_train.max_steps=200 codec_train.threads=2   # CPU, tiny
    python -m s2train stage=codec name=mycorpus codec=s2pro codec_train.adversarial=true \\
        codec_train.precision=bf16-mixed codec_train.segment_s=2 codec_train.batch_size=16 \\
        codec_train.num_workers=8 codec_train.max_steps=400000 codec_train.wandb=true   # one GPU
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from eval.wer import wer
from s2train.judges.asr import ASRConfig, build_asr
from s2train.models.codec import save_codec
from s2train.runs import checkpoint_step
from s2train.training.codec_data import (
    CropStream,
    Utterance,
    index_shards,
    read_audio,
    read_metadata,
    split_heldout,
)
from s2train.training.codec_module import CodecModule

if TYPE_CHECKING:
    from s2train.config import S2Config

PREVIEW_MAX_S = 10.0  # held-out utterances are cut to this length


def _loggers(cfg: S2Config, run_dir: Path) -> list:
    loggers = [CSVLogger(save_dir=str(run_dir), name="logs")]
    if cfg.codec_train.wandb:
        os.environ.setdefault("WANDB_MODE", "offline")
        try:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(
                WandbLogger(
                    project=cfg.codec_train.wandb_project,
                    name=f"{cfg.name}-codec",
                    save_dir=str(run_dir),
                    id=f"{cfg.name}-codec-{cfg.seed}",  # the same run resumes its wandb run
                    resume="allow",
                )
            )
        except ModuleNotFoundError as error:
            raise ValueError("codec_train.wandb=true needs wandb: pip install wandb") from error
    return loggers


def heldout_wer(module: CodecModule, items: list[Utterance], asr_cfg: ASRConfig) -> dict:
    """ASR word error rate of the held-out utterances and of their reconstructions, against the clean
    transcript, on the utterances whose language the ASR judge speaks. The gap is the codec's cost in
    intelligibility: ``wer_delta`` points (reconstruction minus original)."""
    asr = build_asr(asr_cfg)
    metas = [read_metadata(u) for u in items]
    languages = getattr(asr, "languages", None)  # None: any language (whisper)
    chosen = [
        (u, m)
        for u, m in zip(items, metas)
        if m.get("text") and (languages is None or m.get("lang") in languages)
    ]
    if not chosen:
        return {"wer_utterances": 0, "wer_note": f"no held-out utterance in {languages}"}
    originals = [read_audio(u, module.codec.config.sample_rate) for u, _ in chosen]  # whole utterances
    recons = [module.reconstruct(w) for w in originals]
    langs = [m["lang"] for _, m in chosen]
    refs = [m["text"] for _, m in chosen]
    hyp_orig = [t.text for t in asr(originals, langs)]
    hyp_recon = [t.text for t in asr(recons, langs)]
    original, recon = 100 * wer(refs, hyp_orig), 100 * wer(refs, hyp_recon)
    return {
        "wer_utterances": len(chosen),
        "wer_asr": asr_cfg.backend,
        "wer_original": round(original, 2),
        "wer_reconstruction": round(recon, 2),
        "wer_delta": round(recon - original, 2),
    }


def run(cfg: S2Config) -> dict:
    t = cfg.codec_train
    run_dir = Path(cfg.run_dir)
    clean_dir = Path(t.input or Path(cfg.run_root) / cfg.name / "clean")
    items = index_shards(clean_dir / "shards")
    if not items:
        raise ValueError(
            f"no clean shards in {clean_dir / 'shards'}: run stage=clean first or set codec_train.input"
        )
    codec_config = cfg.codec
    rate = codec_config.sample_rate
    train_items, heldout_items = split_heldout(items, t.heldout_items)
    heldout = {u.key: read_audio(u, rate)[: int(PREVIEW_MAX_S * rate)] for u in heldout_items}
    if t.threads:
        torch.set_num_threads(t.threads)

    last = run_dir / "checkpoints" / "last.ckpt"
    resume_from = checkpoint_step(last) if last.exists() else 0
    torch.manual_seed(cfg.seed)
    module = CodecModule(codec_config, t, run_dir, heldout)
    crops = CropStream(train_items, rate, round(t.segment_s * rate), cfg.seed, stream=resume_from)
    loader = DataLoader(
        crops, batch_size=t.batch_size, num_workers=t.num_workers, persistent_workers=t.num_workers > 0
    )
    per_batch = module.steps_per_batch
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every * per_batch,
        save_top_k=-1,
        save_last=True,
    )
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,
        max_steps=t.max_steps * per_batch,
        log_every_n_steps=t.log_every,
        logger=_loggers(cfg, run_dir),
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    started = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    train_s = time.perf_counter() - started
    trainer.save_checkpoint(last, weights_only=False)  # the final step, whatever checkpoint_every says

    codec = module.codec.eval()
    save_codec(codec, run_dir / "codec.pt")
    return {
        "steps": module.step,
        "resumed_from_step": resume_from // per_batch,
        "train_utterances": len(train_items),
        "heldout_utterances": len(heldout_items),
        "heldout_mel_distance": round(module.heldout_mel_distance(), 4),
        "final_losses": {k: round(v, 5) for k, v in module.last_losses.items()},
        "final_mel_loss": round(module.last_losses.get("mel/loss", float("nan")), 4),
        "codebook_perplexity": [round(p, 2) for p in module.last_perplexity],
        "heldout_codebook_usage": module.heldout_usage(),
        "train_wall_s": round(train_s, 2),
        "steps_per_s": round((module.step - resume_from // per_batch) / train_s, 3),
        **heldout_wer(module, heldout_items, cfg.judges.asr),
        "codec": str(run_dir / "codec.pt"),
    }
