"""Speaker embeddings and the one-speaker check.

Backends share ``embed(windows) -> (N, D)`` l2-normalised embeddings of 16 kHz windows:

- ``resemblyzer``: the GE2E d-vector model that ships in the resemblyzer wheel (offline default);
- ``speechbrain``: an ECAPA-TDNN ``EncoderClassifier`` from a local folder (``hyperparams.yaml`` plus
  its checkpoints), e.g. a copy of spkrec-ecapa-voxceleb. Loading it runs the folder's hyperpyyaml, so
  point it only at folders you trust.
- ``wavlm_ecapa``: Seed-TTS-Eval's SIM model (``sim_wavlm.WavLMEcapaSim``) from UniSpeech's
  ``wavlm_large_finetune.pth``, each window embedded alone.

The one-speaker check embeds overlapping windows of a segment's speech (its pauses cut out, so a
silent window cannot look like a stranger) and rejects the segment when two windows are less alike
than ``min_similarity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from s2train.checks import check
from s2train.judges import JUDGE_RATE


@dataclass
class SpeakerConfig:
    backend: str = "resemblyzer"  # resemblyzer | speechbrain | wavlm_ecapa
    # speechbrain: a local folder with hyperparams.yaml; wavlm_ecapa: a local wavlm_large_finetune.pth
    checkpoint: str | None = None
    window_s: float = 1.6
    hop_s: float = 0.8
    min_similarity: float = 0.5  # reject when two windows of one segment are less alike than this

    def __post_init__(self) -> None:
        check(
            self.backend in ("resemblyzer", "speechbrain", "wavlm_ecapa"),
            f"judges.speaker.backend must be resemblyzer, speechbrain or wavlm_ecapa, not {self.backend!r}",
        )
        check(0 < self.hop_s <= self.window_s, "need 0 < speaker.hop_s <= speaker.window_s")


def check_paths(cfg: SpeakerConfig) -> None:
    """The ValueError building this embedder would raise for a missing local model, without building it."""
    if cfg.backend == "speechbrain":
        _check_speechbrain(cfg.checkpoint)
    elif cfg.backend == "wavlm_ecapa":
        _check_wavlm_ecapa(cfg.checkpoint)


def _check_speechbrain(folder: str | None) -> None:
    if not folder or not (Path(folder) / "hyperparams.yaml").is_file():
        raise ValueError(
            "judges.speaker.checkpoint (eval.speechbrain in stage=eval) must be a local speechbrain folder "
            f"with hyperparams.yaml (e.g. a copy of spkrec-ecapa-voxceleb); got {folder!r}"
        )


def _check_wavlm_ecapa(checkpoint: str | None) -> None:
    if not checkpoint or not Path(checkpoint).is_file():
        raise ValueError(
            "judges.speaker.checkpoint (eval.sim_checkpoint in stage=eval) must be UniSpeech's "
            f"wavlm_large_finetune.pth (a local file) for the official SIM; got {checkpoint!r}. "
            "Or choose eval.sim=resemblyzer|speechbrain|none"
        )


class ResemblyzerEmbedder:
    def __init__(self, device: str = "cpu"):
        from resemblyzer import VoiceEncoder

        self.encoder = VoiceEncoder(device, verbose=False)
        self.device = device

    @torch.inference_mode()
    def embed(self, windows: list[np.ndarray]) -> np.ndarray:
        from resemblyzer.audio import wav_to_mel_spectrogram

        mels = [wav_to_mel_spectrogram(w.astype(np.float32)) for w in windows]
        frames = min(len(m) for m in mels)
        batch = torch.from_numpy(np.stack([m[:frames] for m in mels])).to(self.device)
        return self.encoder(batch).cpu().numpy()  # already l2-normalised


class SpeechBrainEmbedder:
    def __init__(self, folder: str | None, device: str = "cpu"):
        _check_speechbrain(folder)
        from speechbrain.inference.speaker import EncoderClassifier
        from speechbrain.utils.fetching import LocalStrategy

        folder = str(Path(folder).resolve())
        # A downloaded spkrec-ecapa-voxceleb names its hub id as pretrained_path: point it here instead.
        has_path = "pretrained_path:" in (Path(folder) / "hyperparams.yaml").read_text()
        self.model = EncoderClassifier.from_hparams(
            source=folder,
            savedir=folder,
            run_opts={"device": device},
            overrides={"pretrained_path": folder} if has_path else {},
            local_strategy=LocalStrategy.NO_LINK,
        )

    @torch.inference_mode()
    def embed(self, windows: list[np.ndarray]) -> np.ndarray:
        length = max(len(w) for w in windows)
        batch = torch.zeros(len(windows), length)
        for i, w in enumerate(windows):
            batch[i, : len(w)] = torch.from_numpy(w.astype(np.float32))
        lengths = torch.tensor([len(w) / length for w in windows])
        emb = self.model.encode_batch(batch, lengths).squeeze(1)
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()


class WavLMEcapaEmbedder:
    """Seed-TTS-Eval's SIM model behind the embedder interface; ``model`` is the ``WavLMEcapaSim`` itself
    (its ``similarity`` resamples each clip from its own rate, as upstream does)."""

    def __init__(self, checkpoint: str | None, device: str = "cpu"):
        _check_wavlm_ecapa(checkpoint)
        from s2train.judges.sim_wavlm import WavLMEcapaSim

        self.model = WavLMEcapaSim(checkpoint, device)

    def embed(self, windows: list[np.ndarray]) -> np.ndarray:
        emb = torch.stack([self.model.embed(w, JUDGE_RATE) for w in windows])
        return torch.nn.functional.normalize(emb, dim=-1).numpy()


Embedder = ResemblyzerEmbedder | SpeechBrainEmbedder | WavLMEcapaEmbedder


def build_embedder(cfg: SpeakerConfig, device: str = "cpu") -> Embedder:
    if cfg.backend == "speechbrain":
        return SpeechBrainEmbedder(cfg.checkpoint, device)
    if cfg.backend == "wavlm_ecapa":
        return WavLMEcapaEmbedder(cfg.checkpoint, device)
    return ResemblyzerEmbedder(device)


def windows_of(wav: np.ndarray, window_s: float, hop_s: float) -> list[np.ndarray]:
    window, hop = int(window_s * JUDGE_RATE), int(hop_s * JUDGE_RATE)
    if len(wav) <= window:
        return [wav]
    starts = list(range(0, len(wav) - window + 1, hop))
    if starts[-1] + window < len(wav):
        starts.append(len(wav) - window)  # the tail gets a window too
    return [wav[s : s + window] for s in starts]


class SpeakerJudge:
    """``judge(wavs) -> [{min_similarity, mean_similarity, windows}]`` and its keep rule."""

    def __init__(self, cfg: SpeakerConfig, device: str = "cpu", embedder: Embedder | None = None):
        self.cfg = cfg
        self.embedder = embedder or build_embedder(cfg, device)

    def __call__(self, wavs: list[np.ndarray]) -> list[dict]:
        out = []
        for wav in wavs:
            windows = windows_of(wav, self.cfg.window_s, self.cfg.hop_s)
            emb = self.embedder.embed(windows)
            sims = emb @ emb.T
            pairs = sims[np.triu_indices(len(emb), k=1)]
            out.append(
                {
                    "min_similarity": round(float(pairs.min()), 4) if len(pairs) else 1.0,
                    "mean_similarity": round(float(pairs.mean()), 4) if len(pairs) else 1.0,
                    "windows": len(windows),
                }
            )
        return out

    def verdict(self, scores: dict) -> str | None:
        return "multi_speaker" if scores["min_similarity"] < self.cfg.min_similarity else None
