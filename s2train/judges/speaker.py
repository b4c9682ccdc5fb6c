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

Before it, ``SpeakerJudge.turns`` finds changes of voice over windows at ``change_hop_s``: the local minima,
at least two windows apart, where the mean embeddings of the windows just before a point and just after
it are less alike than ``change_similarity``.
At each change it checks for overlapped speech by analysis through synthesis: it mixes windows of the
voice before with windows of the voice after, embeds the mixtures, and calls the windows around the
change that are nearer that mixture than either voice alone overlapped. A clean change of turn has at
most one such window (the one straddling the change); ``overlap_min_windows`` or more make an overlap.
Speech with two voices throughout and no solo stretch has no neighbours to compare against: the DNSMOS
threshold and the one-speaker check are what catch it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # changes of voice: split where the mean embeddings either side are less alike than this
    change_similarity: float = 0.82
    change_hop_s: float = 0.4  # hop of the windows change points are found on
    overlap_min_windows: int = 2  # windows at a change nearer the two voices mixed than either: an overlap

    def __post_init__(self) -> None:
        check(
            self.backend in ("resemblyzer", "speechbrain", "wavlm_ecapa"),
            f"judges.speaker.backend must be resemblyzer, speechbrain or wavlm_ecapa, not {self.backend!r}",
        )
        check(0 < self.hop_s <= self.window_s, "need 0 < speaker.hop_s <= speaker.window_s")
        check(
            0 < self.change_hop_s <= self.window_s,
            "need 0 < speaker.change_hop_s <= speaker.window_s",
        )
        check(
            -1.0 <= self.change_similarity <= 1.0,
            f"judges.speaker.change_similarity is a cosine in [-1, 1], not {self.change_similarity}",
        )
        check(
            self.overlap_min_windows >= 1,
            f"judges.speaker.overlap_min_windows must be at least 1, not {self.overlap_min_windows}",
        )


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


@dataclass
class Turn:
    """A stretch of the audio given to ``SpeakerJudge.turns``, in seconds from its start."""

    start: float
    end: float
    voice: int  # turns of one voice share it; OVERLAP for two voices at once
    values: dict = field(default_factory=dict)


OVERLAP = -1


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _change_points(emb: np.ndarray, side: int, threshold: float) -> list[tuple[int, float]]:
    """``(k, similarity)`` where the mean embeddings of up to ``2 * side`` windows before ``k`` and after
    it are least alike, below ``threshold``; changes at least ``2 * side`` windows apart."""
    n, reach = len(emb), 2 * side
    csum = np.concatenate([np.zeros((1, emb.shape[1])), np.cumsum(emb, axis=0)])
    similarity = np.full(n, np.inf)
    for k in range(side, n - side + 1):
        lo, hi = max(0, k - reach), min(n, k + reach)
        similarity[k] = float(_unit(csum[k] - csum[lo]) @ _unit(csum[hi] - csum[k]))
    changes = []
    for k in np.argsort(similarity):
        if similarity[k] >= threshold:
            break
        if all(abs(int(k) - c) >= reach for c, _ in changes):
            changes.append((int(k), round(float(similarity[k]), 4)))
    return sorted(changes)


def _rms_level(wav: np.ndarray) -> np.ndarray:
    return wav / max(float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))), 1e-6) * 0.05


class SpeakerJudge:
    """``judge(wavs) -> [{min_similarity, mean_similarity, windows}]``, its keep rule, and ``turns``."""

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

    def turns(self, wav: np.ndarray) -> list[Turn]:
        """``wav`` (16 kHz speech, pauses cut out) as consecutive turns of one voice or of overlapped
        speech, covering it whole. One turn when no change of voice is found."""
        cfg = self.cfg
        window, hop = int(cfg.window_s * JUDGE_RATE), int(cfg.change_hop_s * JUDGE_RATE)
        duration = len(wav) / JUDGE_RATE
        side = max(1, round(cfg.window_s / cfg.change_hop_s))  # windows a change needs either side
        starts = list(range(0, len(wav) - window + 1, hop))
        if len(starts) < 2 * side:
            return [Turn(0.0, duration, 0)]
        windows = [wav[s : s + window] for s in starts]
        emb = self.embedder.embed(windows)
        changes = _change_points(emb, side, cfg.change_similarity)
        if not changes:
            return [Turn(0.0, duration, 0)]
        bounds = [0] + [k for k, _ in changes] + [len(emb)]
        spans = list(zip(bounds, bounds[1:]))  # windows of each turn between changes

        def core(span: tuple[int, int]) -> list[int]:
            """The windows of ``span`` away from its changes (one voice only), or all of them."""
            a, b = span
            inner = list(range(a + side if a else a, b - side if b < len(emb) else b))
            return inner or list(range(a, b))

        def mixture(left: list[int], right: list[int]) -> np.ndarray:
            pairs = [(left[i * len(left) // 4], right[i * len(right) // 4]) for i in range(4)]
            mixed = self.embedder.embed([_rms_level(windows[i]) + _rms_level(windows[j]) for i, j in pairs])
            return np.stack([_unit(emb[left].mean(0)), _unit(emb[right].mean(0)), _unit(mixed.mean(0))])

        cuts: list[tuple[float, float, dict]] = []  # (end of the turn before, start of the one after, values)
        overlapped: set[int] = set()
        for t in range(1, len(spans) - 1):  # a turn between two others that sounds like both at once
            refs = mixture(core(spans[t - 1]), core(spans[t + 1]))
            middle = _unit(emb[spans[t][0] : spans[t][1]].mean(0))
            scores = refs @ middle
            if float(refs[0] @ refs[1]) < cfg.change_similarity and scores[2] > scores[:2].max():
                overlapped.add(t)
                start, end = starts[spans[t][0]], starts[spans[t][1] - 1] + window
                values = {
                    "mixture_margin": round(float(scores[2] - scores[:2].max()), 4),
                    "windows": int(spans[t][1] - spans[t][0]),
                }
                cuts.append((start / JUDGE_RATE, end / JUDGE_RATE, values))
        for t, (k, similarity) in enumerate(changes):
            if t in overlapped or t + 1 in overlapped:
                continue
            a, b = spans[t][0], spans[t + 1][1]
            refs = mixture(core(spans[t]), core(spans[t + 1]))
            scores = emb[a:b] @ refs.T
            margin = scores[:, 2] - scores[:, :2].max(1)
            group = _group_at([a + i for i in np.flatnonzero(margin > 0)], k, side)
            if len(group) >= cfg.overlap_min_windows:  # two voices at once around the change
                values = {
                    "voices_similarity": similarity,
                    "mixture_windows": len(group),
                    "mixture_margin": round(float(margin[np.array(group) - a].max()), 4),
                }
                start, end = starts[group[0]] / JUDGE_RATE, (starts[group[-1]] + window) / JUDGE_RATE
                cuts.append((start, end, values))
            else:  # window k is the first mostly after the change, window k - 1 the last mostly before
                at = (starts[k] + window / 2 - hop / 2) / JUDGE_RATE
                cuts.append((at, at, {"voices_similarity": similarity}))
        cuts.sort(key=lambda c: c[0])
        return _turns_from_cuts(cuts, duration, emb, starts, window, cfg.change_similarity)


def _group_at(indices: list[int], k: int, side: int) -> list[int]:
    """The run of ``indices`` (gaps under ``side``) that comes within ``side`` windows of ``k``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i - runs[-1][-1] <= side:
            runs[-1].append(i)
        else:
            runs.append([i])
    return next((r for r in runs if r[0] - side <= k <= r[-1] + side), [])


def _turns_from_cuts(cuts, duration, emb, starts, window, threshold) -> list[Turn]:
    turns: list[Turn] = []
    t = 0.0
    for start, end, values in cuts:
        start, end = max(start, t), min(max(end, start), duration)
        if start > t:
            turns.append(Turn(t, start, 0))
        if end > start:
            turns.append(Turn(start, end, OVERLAP, values))
        t = max(t, end)
    if t < duration:
        turns.append(Turn(t, duration, 0))
    # number the voices: a turn like an earlier voice's (mean embedding) is that voice again
    voices: list[np.ndarray] = []
    for turn in turns:
        if turn.voice == OVERLAP:
            continue
        inside = [
            i
            for i, s in enumerate(starts)
            if s >= turn.start * JUDGE_RATE and s + window <= turn.end * JUDGE_RATE
        ]
        centroid = _unit(emb[inside].mean(0)) if inside else None
        match = (
            None
            if centroid is None
            else next((v for v, c in enumerate(voices) if float(c @ centroid) >= threshold), None)
        )
        if match is None:
            match = len(voices)
            voices.append(centroid if centroid is not None else np.zeros(emb.shape[1]))
        turn.voice = match
    return turns
