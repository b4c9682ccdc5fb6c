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

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from s2train.audio import resample
from s2train.checkpoints import save_codec
from s2train.judges import JUDGE_RATE
from s2train.judges.suite import JudgeSuite
from s2train.judges.wer import wer
from s2train.runs import stage_input
from s2train.training.codec_data import (
    CropStream,
    Utterance,
    index_shards,
    read_audio,
    read_metadata,
    split_heldout,
)
from s2train.training.codec_module import CodecModule
from s2train.training.trainer import TrainerSpec, build_trainer, fit, resume_point

if TYPE_CHECKING:
    from s2train.config import S2Config

PREVIEW_MAX_S = 10.0  # held-out utterances are cut to this length


def transcript_source(meta: dict) -> str:
    """``"given"`` when an utterance's ``text`` came with the data, ``"asr"`` when the ASR judge wrote it
    (``text_source`` in the clean metadata; shards from before that field: text equal to ``asr_text``)."""
    if "text_source" in meta:
        return meta["text_source"]
    return "asr" if meta.get("text") == meta.get("asr_text") else "given"


def wer_items(metas: list[dict], languages) -> tuple[list[int], str]:
    """The held-out utterances ``heldout_wer`` scores and the source of their transcripts: those whose
    language the ASR judge speaks (``languages`` None: any), and of them the ones with a given transcript
    if there are any. Scored against a transcript it wrote itself, the judge's WER on the original is 0 by
    construction, so every word it hears differently in the reconstruction would count against the codec,
    even where it misheard the original too; only where no transcript was given is that the measure."""
    spoken = [
        i for i, m in enumerate(metas) if m.get("text") and (languages is None or m.get("lang") in languages)
    ]
    given = [i for i in spoken if transcript_source(metas[i]) == "given"]
    return (given, "given") if given else (spoken, "asr")


def heldout_wer(module: CodecModule, items: list[Utterance], judges: JudgeSuite) -> dict:
    """ASR word error rate of the held-out utterances and of their reconstructions, against the
    transcripts (``wer_items``: given ones where there are any), on the utterances whose language the
    suite's ASR judge speaks. The gap is the codec's cost in intelligibility: ``wer_delta`` points
    (reconstruction minus original)."""
    asr = judges.asr
    metas = [read_metadata(u) for u in items]
    languages = getattr(asr, "languages", None)  # None: any language (whisper)
    indices, source = wer_items(metas, languages)
    if not indices:
        return {"wer_utterances": 0, "wer_note": f"no held-out utterance in {languages}"}
    chosen = [(items[i], metas[i]) for i in indices]
    rate = module.codec.config.sample_rate
    originals = [read_audio(u, rate) for u, _ in chosen]  # whole utterances
    recons = [module.reconstruct(w) for w in originals]
    originals = [resample(w, rate, JUDGE_RATE) for w in originals]  # the judges hear 16 kHz
    recons = [resample(w, rate, JUDGE_RATE) for w in recons]
    langs = [m["lang"] for _, m in chosen]
    refs = [m["text"] for _, m in chosen]
    hyp_orig = [t.text for t in asr(originals, langs)]
    hyp_recon = [t.text for t in asr(recons, langs)]
    original, recon = 100 * wer(refs, hyp_orig), 100 * wer(refs, hyp_recon)
    return {
        "wer_utterances": len(chosen),
        "wer_transcripts": source,
        "wer_asr": judges.cfg.asr.backend,
        "wer_original": round(original, 2),
        "wer_reconstruction": round(recon, 2),
        "wer_delta": round(recon - original, 2),
    }


def run(cfg: S2Config) -> dict:
    t = cfg.codec_train
    run_dir = Path(cfg.run_dir)
    clean_dir = stage_input(cfg, "clean", t.input)
    items = index_shards(clean_dir / "shards")
    if not items:
        raise ValueError(
            f"no clean shards in {clean_dir / 'shards'}: run stage=clean first or set codec_train.input"
        )
    codec_config = cfg.codec
    rate = codec_config.sample_rate
    train_items, heldout_items = split_heldout(items, t.heldout_items)
    heldout = {u.key: read_audio(u, rate)[: int(PREVIEW_MAX_S * rate)] for u in heldout_items}
    resume = resume_point(run_dir)  # ours or SLURM's pre-emption checkpoint
    torch.manual_seed(cfg.seed)
    module = CodecModule(codec_config, t, run_dir, heldout)
    crops = CropStream(train_items, rate, round(t.segment_s * rate), cfg.seed, stream=resume.step)
    loader = DataLoader(
        crops, batch_size=t.batch_size, num_workers=t.num_workers, persistent_workers=t.num_workers > 0
    )
    per_batch = module.steps_per_batch  # Lightning counts each optimizer's step
    trainer = build_trainer(
        TrainerSpec(
            run_dir=run_dir,
            run_id=f"{cfg.name}-{cfg.stage}-{cfg.seed}",
            max_steps=t.max_steps * per_batch,
            checkpoint_every=t.checkpoint_every * per_batch,
            log_every=t.log_every,
            accelerator=t.accelerator,
            precision=t.precision,
            progress=False,
            wandb=t.wandb,
            wandb_project=t.wandb_project,
            threads=t.threads,
        )
    )
    train_s = fit(trainer, module, resume, train_dataloaders=loader)

    codec = module.codec.eval()
    save_codec(codec, run_dir / "codec.pt")
    return {
        "steps": module.step,
        "resumed_from_step": resume.step // per_batch,
        "train_utterances": len(train_items),
        "heldout_utterances": len(heldout_items),
        "heldout_mel_distance": round(module.heldout_mel_distance(), 4),
        "final_losses": {k: round(v, 5) for k, v in module.last_losses.items()},
        "final_mel_loss": round(module.last_losses.get("mel/loss", float("nan")), 4),
        "codebook_perplexity": [round(p, 2) for p in module.last_perplexity],
        "heldout_codebook_usage": module.heldout_usage(),
        "train_wall_s": round(train_s, 2),
        "steps_per_s": round((module.step - resume.step // per_batch) / train_s, 3),
        **heldout_wer(module, heldout_items, JudgeSuite(cfg.judges, cfg.seed)),
        "codec": str(run_dir / "codec.pt"),
    }
