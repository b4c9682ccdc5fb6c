"""Signal quality: DNSMOS (speechmos's ONNX models), SNR, clipping and audio bandwidth.

Every score is stored with the segment; the keep rule compares each to its threshold in a fixed order
(clipping, SNR, bandwidth, DNSMOS) and names the first one that fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from s2train.checks import check
from s2train.judges import JUDGE_RATE


@dataclass
class QualityConfig:
    dnsmos_ovrl_min: float = 3.0  # Emilia's keep rule
    calibration: str | None = None  # a JSON file whose dnsmos_ovrl_min replaces the value above
    dnsmos_hop_s: float = 1.0  # the reference DNSMOS script hops its 9 s window by 1 s
    onnx_threads: int = 0  # 0: onnxruntime decides
    snr_min_db: float = 15.0
    clipping_max_ratio: float = 0.001  # fraction of samples at full scale
    bandwidth_min_hz: float = 3500.0  # rejects telephone-band audio

    def __post_init__(self) -> None:
        check(self.dnsmos_hop_s > 0, f"judges.quality.dnsmos_hop_s must be positive, not {self.dnsmos_hop_s}")
        check(
            self.onnx_threads >= 0, "judges.quality.onnx_threads cannot be negative (0: onnxruntime decides)"
        )
        check(
            0 <= self.clipping_max_ratio <= 1,
            f"judges.quality.clipping_max_ratio is a fraction of samples: 0 to 1, not {self.clipping_max_ratio}",
        )


DNSMOS_WINDOW_S = 9.01  # the input length of the DNSMOS models


class DNSMOS:
    """speechmos's DNSMOS models (P.835 SIG/BAK/OVRL and P.808), with sessions made once."""

    def __init__(self, threads: int):
        import onnxruntime as ort
        from speechmos import dnsmos as speechmos_dnsmos

        models = Path(speechmos_dnsmos.__file__).parent / "dnsmos_models"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
        providers = ["CPUExecutionProvider"]
        self.primary = ort.InferenceSession(str(models / "sig_bak_ovr.onnx"), options, providers=providers)
        self.p808 = ort.InferenceSession(str(models / "model_v8.onnx"), options, providers=providers)
        # speechmos's own feature and calibration code, so our scores are its scores
        self._reference = speechmos_dnsmos.DNSMOS.__new__(speechmos_dnsmos.DNSMOS)

    def __call__(self, wav: np.ndarray, hop_s: float) -> dict[str, float]:
        """Mean scores over 9.01 s windows hopped by ``hop_s`` (short audio is repeated to fill one)."""
        window = int(DNSMOS_WINDOW_S * JUDGE_RATE)
        wav = np.clip(wav.astype(np.float32), -1.0, 1.0)
        while len(wav) < window:
            wav = np.concatenate([wav, wav]) if len(wav) else np.zeros(window, np.float32)
        hop = max(1, int(hop_s * JUDGE_RATE))
        scores = []
        for start in range(0, len(wav) - window + 1, hop):
            chunk = wav[start : start + window]
            mel = self._reference.audio_melspec(audio=chunk[:-160]).astype(np.float32)[None]
            p808 = float(self.p808.run(None, {"input_1": mel})[0][0][0])
            sig, bak, ovrl = self.primary.run(None, {"input_1": chunk[None]})[0][0]
            sig, bak, ovrl = self._reference.get_polyfit_val(sig, bak, ovrl, False)
            scores.append((ovrl, sig, bak, p808))
        ovrl, sig, bak, p808 = np.mean(scores, axis=0)
        return {"ovrl": float(ovrl), "sig": float(sig), "bak": float(bak), "p808": float(p808)}


@lru_cache(maxsize=2)
def dnsmos_model(threads: int = 0) -> DNSMOS:
    """One set of ONNX sessions per process (and thread setting), shared by every caller."""
    return DNSMOS(threads)


def snr_db(wav: np.ndarray, sample_rate: int = JUDGE_RATE) -> float:
    """A blind SNR estimate from the spread of 20 ms frame powers: the loud frames (90th percentile)
    against the quiet ones (10th percentile), which within speech are pauses and weak phones."""
    frame = int(0.02 * sample_rate)
    hop = frame // 2
    if len(wav) < frame:
        return 0.0
    frames = np.lib.stride_tricks.sliding_window_view(wav, frame)[::hop]
    power = (frames.astype(np.float64) ** 2).mean(axis=1)
    noise = max(np.percentile(power, 10), 1e-12)
    signal = np.percentile(power, 90)
    return float(np.clip(10 * np.log10(max(signal - noise, 1e-12) / noise), -20.0, 100.0))


def clipping_ratio(native: np.ndarray) -> float:
    """Fraction of samples on a plateau at the peak: at full scale, or clipped and then scaled down."""
    if len(native) == 0:
        return 0.0
    peak = float(np.max(np.abs(native)))
    if peak < 1e-4:
        return 0.0
    at_peak = np.abs(native) >= 0.999 * peak
    # a plateau is two or more neighbours at the peak; a single clean maximum is not clipping
    plateau = at_peak[1:] & at_peak[:-1]
    return float(plateau.sum() / len(native))


def bandwidth_hz(native: np.ndarray, sample_rate: int, floor_db: float = -50.0) -> float:
    """Highest frequency whose long-term power is within ``floor_db`` of the spectrum's peak,
    measured on the louder half of the frames (so a silent tail does not hide the content)."""
    n_fft = 1 << int(np.ceil(np.log2(0.04 * sample_rate)))
    if len(native) < n_fft:
        return 0.0
    frames = np.lib.stride_tricks.sliding_window_view(native, n_fft)[:: n_fft // 2]
    spectra = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2
    energy = spectra.sum(axis=1)
    loud = spectra[energy >= np.median(energy)]
    psd_db = 10 * np.log10(loud.mean(axis=0) + 1e-20)
    psd_db = np.convolve(psd_db, np.ones(5) / 5, mode="same")  # smooth single-bin spikes
    above = np.nonzero(psd_db >= psd_db.max() + floor_db)[0]
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    return float(freqs[above[-1]]) if len(above) else 0.0


def check_paths(cfg: QualityConfig) -> None:
    """The ValueError a missing calibration file would raise when the judge is built, without building it."""
    if cfg.calibration and not Path(cfg.calibration).is_file():
        raise ValueError(
            f"judges.quality.calibration points at {Path(cfg.calibration)}, which does not exist; run the "
            "stage that writes it (stage=demo_corpus) or set judges.quality.calibration=null"
        )


def load_calibrated_threshold(cfg: QualityConfig) -> float:
    """``dnsmos_ovrl_min``, or the value a calibration file (written by ``stage=demo_corpus``) gives."""
    if not cfg.calibration:
        return cfg.dnsmos_ovrl_min
    check_paths(cfg)
    return float(json.loads(Path(cfg.calibration).read_text())["dnsmos_ovrl_min"])


class QualityJudge:
    """Scores for a batch of excerpts and the keep rule over them."""

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg
        self.ovrl_min = load_calibrated_threshold(cfg)
        self.dnsmos = dnsmos_model(cfg.onnx_threads)

    def __call__(self, judge_wavs: list[np.ndarray], natives: list[tuple[np.ndarray, int]]) -> list[dict]:
        """``judge_wavs`` at 16 kHz; ``natives`` as ``(samples, rate)`` at the file's own rate."""
        return [
            {
                "dnsmos": self.dnsmos(wav, self.cfg.dnsmos_hop_s),
                "snr_db": snr_db(wav),
                "clipping": clipping_ratio(native),
                "bandwidth_hz": bandwidth_hz(native, rate),
            }
            for wav, (native, rate) in zip(judge_wavs, natives)
        ]

    def verdict(self, scores: dict) -> str | None:
        """The reject reason, or None to keep."""
        if scores["clipping"] > self.cfg.clipping_max_ratio:
            return "clipping"
        if scores["snr_db"] < self.cfg.snr_min_db:
            return "low_snr"
        if scores["bandwidth_hz"] < self.cfg.bandwidth_min_hz:
            return "low_bandwidth"
        if scores["dnsmos"]["ovrl"] < self.ovrl_min:
            return "low_dnsmos"
        return None
