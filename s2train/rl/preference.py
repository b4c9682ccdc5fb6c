"""``stage=preference``: a small learned preference model for GRPO's ``preference`` reward.

Shape legend: B pairs, D features, T encoder frames.

**Features.** A frozen speech encoder turns a clip into frames (T, D'); the clip's feature is their mean
and standard deviation over time (D = 2 D'), standardised with the training set's statistics (stored in
the checkpoint). Encoders (``preference.encoder``):

- ``codec``: the encoder of an s2train codec (``preference.encoder_path``, default ``tokenize.codec``),
  the latent before quantisation;
- ``wavlm``: WavLM-Large from a local ``wavlm_large_finetune.pth`` (the checkpoint of Seed-TTS-Eval's SIM,
  ``s2train.judges.sim_wavlm``), its last hidden state;
- ``whisper``: an openai-whisper checkpoint file, its audio encoder over the 30 s log-mel window, cut to
  the clip's frames.

**Scorer.** ``score(x) = w2 . gelu(W1 x + b1) + b2``, trained with the Bradley-Terry loss
``-log sigmoid(score(preferred) - score(other))`` on the shared trainer (checkpoints, exact resume,
``losses.jsonl``, a curve); the held-out pairs' accuracy (the preferred clip scored higher) is the figure.

**Pairs** (``preference.pairs``): a JSONL file of ``{"a": wav, "b": wav, "preferred": "a" | "b"}`` (paths
relative to the file, and never outside its folder), or a Hugging Face dataset saved with
``save_to_disk`` with audio columns ``a`` and ``b`` and a ``preferred`` column. With ``preference.pairs``
unset, pairs are made from a clean run's shards (``preference.clean``, default the run's ``clean``): each
clip is preferred over a degraded copy of itself (white noise at 0-10 dB SNR, hard clipping, the codec's
first codebook alone, or a time stretch by 0.6 or 1.6), which is what the demo does.

Outputs: ``preference.safetensors`` + ``preference.json`` (what ``PreferenceScorer.open`` reads),
``results.json`` (held-out accuracy, pairs), ``losses.jsonl`` and ``loss_curve.png``.

    python -m s2train experiment=demo stage=preference
    python -m s2train stage=preference name=mine preference.pairs=/data/prefs.jsonl \\
        preference.encoder=wavlm preference.encoder_path=/models/wavlm_large_finetune.pth
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2train.audio import resample
from s2train.checks import check
from s2train.judges import JUDGE_RATE
from s2train.training.lm_module import plot_losses, read_losses, warmup_cosine
from s2train.training.trainer import TrainerSpec, build_trainer, fit, resume_point

if TYPE_CHECKING:
    from s2train.config import S2Config

ENCODERS = ("codec", "wavlm", "whisper")
DEGRADATIONS = ("noise", "clipping", "codec", "stretch")


@dataclass
class PreferenceConfig:
    """``stage=preference`` (``s2train.rl.preference``)."""

    pairs: str | None = None  # a pairs JSONL or a saved HF dataset; None: made from the clean shards
    clean: str | None = None  # the clean run to make pairs from; None: run_root/name/clean
    degradations: list[str] = field(default_factory=lambda: list(DEGRADATIONS))
    encoder: str = "codec"  # codec | wavlm | whisper
    encoder_path: str | None = (
        None  # codec: a codec.pt or codec run (None: tokenize.codec); else a local model
    )
    heldout: float = 0.2  # share of the pairs held out for the accuracy
    hidden: int = 64
    max_steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2
    checkpoint_every: int = 100
    log_every: int = 10
    progress: bool = True
    threads: int = 0

    def __post_init__(self) -> None:
        check(
            self.encoder in ENCODERS,
            f"preference.encoder must be one of {', '.join(ENCODERS)}, not {self.encoder!r}",
        )
        unknown = [d for d in self.degradations if d not in DEGRADATIONS]
        check(
            not unknown,
            f"preference.degradations has unknown kinds {unknown}; they are {', '.join(DEGRADATIONS)}",
        )
        check(0 < self.heldout < 1, f"preference.heldout must be in (0, 1), not {self.heldout}")
        for name in ("hidden", "max_steps", "batch_size", "checkpoint_every", "log_every"):
            check(
                getattr(self, name) >= 1, f"preference.{name} must be at least 1, not {getattr(self, name)}"
            )
        check(self.lr > 0, "preference.lr must be positive")


# ------------------------------------------------------------------------------------------ encoders


class FrameEncoder:
    """A frozen speech encoder: 16 kHz clip -> frames (T, D')."""

    def __init__(self, kind: str, path: str | None):
        self.kind, self.path = kind, str(Path(path).resolve()) if path else None
        if kind == "codec":
            from s2train.checkpoints import open_codec

            self.codec, _ = open_codec(path, key="preference.encoder_path")
            self.codec.eval()
        elif kind == "wavlm":
            if not path or not Path(path).is_file():
                raise ValueError(
                    "preference.encoder=wavlm needs preference.encoder_path, a local wavlm_large_finetune.pth "
                    f"(Seed-TTS-Eval's SIM checkpoint, which holds WavLM-Large); got {path!r}"
                )
            from s2train.judges.sim_wavlm import WavLMEcapaSim

            self.wavlm = WavLMEcapaSim(path).model.feature_extract
        else:
            if not path or not Path(path).is_file():
                raise ValueError(
                    f"preference.encoder=whisper needs preference.encoder_path, a whisper .pt checkpoint; got {path!r}"
                )
            import whisper

            self.whisper = whisper.load_model(path, device="cpu").eval()

    @torch.no_grad()
    def frames(self, wav_16k: np.ndarray) -> Tensor:
        wav = torch.from_numpy(np.ascontiguousarray(wav_16k, dtype=np.float32))
        if self.kind == "codec":
            rate = self.codec.config.sample_rate
            audio = torch.from_numpy(resample(wav_16k, JUDGE_RATE, rate)) if rate != JUDGE_RATE else wav
            latent = self.codec.encoder(self.codec._padded_batch(audio))  # (1, D', T)
            return latent[0].t()
        if self.kind == "wavlm":
            return self.wavlm(wav[None])[-1][0]  # the encoder's output after its final layer norm
        import whisper

        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(wav), self.whisper.dims.n_mels)
        hidden = self.whisper.encoder(mel[None])[0]  # (1500, D') for 30 s
        used = max(1, min(hidden.shape[0], int(np.ceil(len(wav_16k) / JUDGE_RATE * 50))))
        return hidden[:used]

    def features(self, wavs: list[np.ndarray]) -> Tensor:
        """(B, 2 D'): mean and std of each clip's frames."""
        out = []
        for wav in wavs:
            f = self.frames(wav).float()
            std = f.std(dim=0) if f.shape[0] > 1 else torch.zeros(f.shape[1])
            out.append(torch.cat([f.mean(dim=0), std]))
        return torch.stack(out)


class Scorer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net((features - self.mean) / self.std)[..., 0]


def bradley_terry_loss(preferred: Tensor, other: Tensor) -> Tensor:
    """Mean of ``-log sigmoid(preferred - other)`` over pairs of scores."""
    return F.softplus(other - preferred).mean()


class PreferenceScorer:
    """A trained preference model: clips -> scores (higher: preferred)."""

    def __init__(self, scorer: Scorer, encoder: FrameEncoder):
        self.scorer, self.encoder = scorer.eval(), encoder

    @classmethod
    def open(cls, path: str | Path) -> PreferenceScorer:
        from safetensors.torch import load_file

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        weights, meta = folder / "preference.safetensors", folder / "preference.json"
        if not weights.is_file() or not meta.is_file():
            raise ValueError(
                f"{path} holds no preference model (preference.safetensors + preference.json): train one with "
                "python -m s2train stage=preference"
            )
        info = json.loads(meta.read_text())
        scorer = Scorer(info["dim"], info["hidden"])
        scorer.load_state_dict(load_file(str(weights)))
        return cls(scorer, FrameEncoder(info["encoder"], info["encoder_path"]))

    @torch.no_grad()
    def score(self, wavs: list[np.ndarray], sample_rate: int = JUDGE_RATE) -> np.ndarray:
        wavs = [resample(np.asarray(w, np.float32), sample_rate, JUDGE_RATE) for w in wavs]
        return self.scorer(self.encoder.features(wavs)).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------- pairs


def degrade(wav: np.ndarray, kind: str, rng: np.random.Generator, codec=None) -> np.ndarray:
    """A worse copy of a 16 kHz clip (module doc, "Pairs")."""
    wav = np.asarray(wav, np.float32)
    if kind == "noise":
        snr = rng.uniform(0.0, 10.0)
        power = float(np.mean(wav**2)) or 1e-8
        return (wav + rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), len(wav))).astype(np.float32)
    if kind == "clipping":
        peak = float(np.max(np.abs(wav))) or 1.0
        limit = peak * rng.uniform(0.05, 0.2)
        return (np.clip(wav, -limit, limit) * (peak / limit) * 0.5).astype(np.float32)
    if kind == "codec":
        if codec is None:
            raise ValueError(
                "the codec degradation needs a codec (preference.encoder_path or tokenize.codec)"
            )
        rate = codec.config.sample_rate
        with torch.no_grad():
            codes = codec.encode(torch.from_numpy(resample(wav, JUDGE_RATE, rate)), rate)
            out = codec.decode(codes[:1])[0, 0].numpy()
        return resample(out, rate, JUDGE_RATE)[: len(wav)].astype(np.float32)
    if kind == "stretch":
        import librosa

        return librosa.effects.time_stretch(wav, rate=float(rng.choice([0.6, 1.6]))).astype(np.float32)
    raise ValueError(f"unknown degradation {kind!r}; they are {', '.join(DEGRADATIONS)}")


def _inside(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{name!r} lies outside {folder}: pairs may only name audio beside their file")
    return path


def read_pairs(spec: str) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """``(a, b, preferred: 0 = a, 1 = b, group)`` at 16 kHz from a pairs JSONL or a saved HF dataset
    (each pair its own group)."""
    import soundfile as sf

    from s2train.runs import jsonl_lines

    path = Path(spec)
    out = []
    if path.is_dir():
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        for i, row in enumerate(data):
            if row.get("preferred") not in ("a", "b"):
                raise ValueError(
                    f"{path} row {i}: preferred must be 'a' or 'b', not {row.get('preferred')!r}"
                )
            clips = [
                resample(np.asarray(row[k]["array"], np.float32), row[k]["sampling_rate"], JUDGE_RATE)
                for k in "ab"
            ]
            out.append((clips[0], clips[1], int(row["preferred"] == "b"), i))
        return out
    if not path.is_file():
        raise ValueError(f"preference.pairs={spec} is neither a pairs JSONL file nor a saved dataset folder")
    for n, where, row in jsonl_lines(path):
        if not isinstance(row, dict) or row.get("preferred") not in ("a", "b") or not {"a", "b"} <= set(row):
            raise ValueError(f'{where}: expected {{"a": wav, "b": wav, "preferred": "a" or "b"}}')
        clips = []
        for key in "ab":
            wav, rate = sf.read(_inside(path.parent, row[key]), dtype="float32", always_2d=True)
            clips.append(resample(wav.mean(axis=1), rate, JUDGE_RATE))
        out.append((clips[0], clips[1], int(row["preferred"] == "b"), n))
    return out


def demo_pairs(clean_dir: Path, kinds: list[str], seed: int, codec=None, max_s: float = 6.0):
    """Every clean utterance (its first ``max_s``) preferred over a copy degraded in each of ``kinds``;
    ``(a, b, preferred, clip)`` with the clip's index, so a split can keep a clip's pairs together."""
    from s2train.training.codec_data import index_shards, read_audio

    items = index_shards(Path(clean_dir) / "shards")
    if not items:
        raise ValueError(f"{clean_dir}/shards holds no utterances to make preference pairs from")
    rng = np.random.default_rng(seed)
    out = []
    for i, item in enumerate(items):
        wav = read_audio(item, JUDGE_RATE)[: int(max_s * JUDGE_RATE)]
        for kind in kinds:
            worse = degrade(wav, kind, rng, codec)
            swap = bool(rng.integers(2))  # the preferred clip is a or b at random
            out.append((worse, wav, 1, i) if swap else (wav, worse, 0, i))
    return out


# ------------------------------------------------------------------------------------------ training


class PreferenceModule(L.LightningModule):
    def __init__(self, dim: int, cfg: PreferenceConfig, run_dir: Path, mean: Tensor, std: Tensor):
        super().__init__()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.scorer = Scorer(dim, cfg.hidden)
        self.scorer.mean.copy_(mean)
        self.scorer.std.copy_(std)

    def training_step(self, batch, batch_idx):
        a, b, preferred = batch
        sa, sb = self.scorer(a), self.scorer(b)
        good = torch.where(preferred == 0, sa, sb)
        bad = torch.where(preferred == 0, sb, sa)
        loss = bradley_terry_loss(good, bad)
        accuracy = (good > bad).float().mean()
        self.log_dict({"loss/total": loss.detach(), "accuracy": accuracy}, on_step=True, on_epoch=False)
        if self.trainer.is_global_zero:
            with (self.run_dir / "losses.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.global_step + 1, "loss/total": float(loss.detach())}) + "\n")
        return loss

    def on_train_start(self) -> None:
        path = self.run_dir / "losses.jsonl"
        if self.trainer.is_global_zero and path.exists():
            kept = [r for r in read_losses(path) if r["step"] <= self.global_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def configure_optimizers(self):
        c = self.cfg
        optimizer = torch.optim.AdamW(self.scorer.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, max(1, c.max_steps // 20), c.max_steps, 0.1)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _PairBatches(torch.utils.data.IterableDataset):
    """Endless shuffled batches of the training pairs, a function of (seed, step): resume draws the same."""

    def __init__(self, a: Tensor, b: Tensor, preferred: Tensor, batch_size: int, seed: int, start: int):
        self.a, self.b, self.preferred = a, b, preferred
        self.batch_size, self.seed, self.start = batch_size, seed, start

    def __iter__(self):
        step = self.start
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            idx = torch.randint(0, len(self.a), (self.batch_size,), generator=g)
            yield self.a[idx], self.b[idx], self.preferred[idx]
            step += 1


def split_pairs(groups: list[int], heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` pair indices; a group (the pairs made from one clip) stays on one side."""
    names = sorted(set(groups))
    order = np.random.default_rng([seed, 7]).permutation(len(names))
    k = max(1, int(round(len(names) * heldout)))
    if len(names) - k < 2:
        raise ValueError(
            f"{len(names)} preference clips are too few to hold out {heldout:.0%} and still train"
        )
    held = {names[i] for i in order[:k]}
    inside = np.array([g in held for g in groups])
    return np.flatnonzero(~inside), np.flatnonzero(inside)


def run(cfg: S2Config) -> dict:
    from s2train.runs import stage_input, write_json_atomic

    p = cfg.preference
    run_dir = Path(cfg.run_dir)
    if p.threads:
        torch.set_num_threads(p.threads)
    encoder_path = p.encoder_path or (cfg.tokenize.codec if p.encoder == "codec" else None)
    encoder = FrameEncoder(p.encoder, encoder_path)
    codec = encoder.codec if p.encoder == "codec" else None
    if p.pairs:
        pairs, source = read_pairs(p.pairs), str(p.pairs)
    else:
        clean = stage_input(cfg, "clean", p.clean)
        if codec is None and "codec" in p.degradations:
            from s2train.checkpoints import open_codec

            codec, _ = open_codec(cfg.tokenize.codec)
        pairs, source = demo_pairs(clean, p.degradations, cfg.seed, codec), f"{clean} (clean vs degraded)"
    train_idx, held_idx = split_pairs([x[3] for x in pairs], p.heldout, cfg.seed)
    a = encoder.features([x[0] for x in pairs])
    b = encoder.features([x[1] for x in pairs])
    preferred = torch.tensor([x[2] for x in pairs])
    both = torch.cat([a[train_idx], b[train_idx]])
    mean, std = both.mean(dim=0), both.std(dim=0).clamp_min(1e-5)

    module = PreferenceModule(a.shape[1], p, run_dir, mean, std)
    resume = resume_point(run_dir)
    spec = TrainerSpec(
        run_dir=run_dir,
        run_id=f"{cfg.name}-preference-{cfg.seed}",
        max_steps=p.max_steps,
        checkpoint_every=p.checkpoint_every,
        log_every=p.log_every,
        accelerator="cpu",
        progress=p.progress,
        threads=p.threads,
    )
    trainer = build_trainer(spec)
    t = torch.as_tensor(train_idx)
    data = _PairBatches(a[t], b[t], preferred[t], p.batch_size, cfg.seed, resume.step)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    train_s = fit(trainer, module, resume, train_dataloaders=loader)

    scorer = module.scorer.eval()
    with torch.no_grad():
        h = torch.as_tensor(held_idx)
        sa, sb = scorer(a[h]), scorer(b[h])
        right = torch.where(preferred[h] == 0, sa > sb, sb > sa)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in scorer.state_dict().items()}, str(run_dir / "preference.safetensors")
    )
    info = {
        "encoder": p.encoder,
        "encoder_path": str(encoder.path) if encoder.path else None,
        "dim": a.shape[1],
        "hidden": p.hidden,
    }
    write_json_atomic(run_dir / "preference.json", info)
    rows = read_losses(run_dir / "losses.jsonl")
    if rows:
        plot_losses(
            rows, run_dir / "loss_curve.png", "preference model", ("loss/total",), "Bradley-Terry loss"
        )
    return {
        "pairs": len(pairs),
        "pairs_source": source,
        "train_pairs": len(train_idx),
        "heldout_pairs": len(held_idx),
        "heldout_accuracy": round(float(right.float().mean()), 4),
        "encoder": p.encoder,
        "steps": p.max_steps,
        "resumed_from_step": resume.step,
        "train_wall_s": round(train_s, 2),
    }
