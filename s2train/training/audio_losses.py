"""Reconstruction losses of the codec: multi-scale log-mel L1 and multi-resolution STFT loss.

Shape legend: B batch, T samples, F frequency bins, M mel bands, N STFT frames.
Both take the reconstruction and the target as (B, 1, T) waveforms and return a scalar.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchaudio.functional import melscale_fbanks


def magnitude(wav: Tensor, n_fft: int, window: Tensor) -> Tensor:
    """(B, 1, T) or (B, T) -> STFT magnitudes (B, F = n_fft // 2 + 1, N), hop n_fft // 4, Hann window."""
    spec = torch.stft(
        wav.reshape(-1, wav.shape[-1]).float(),
        n_fft,
        hop_length=n_fft // 4,
        window=window,
        center=True,
        return_complex=True,
    )
    return spec.abs()


class LogMel(nn.Module):
    """(B, 1, T) -> log10 mel spectrogram (B, M, N), magnitudes clamped at 1e-5 (DAC's mel loss)."""

    def __init__(self, sample_rate: int, n_fft: int, n_mels: int):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fbank = melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, norm="slaney")
        self.register_buffer("fbank", fbank.T.contiguous(), persistent=False)  # (M, F)

    def forward(self, wav: Tensor) -> Tensor:
        mel = self.fbank @ magnitude(wav, self.n_fft, self.window)  # (B, M, N)
        return mel.clamp(min=1e-5).log10()


class MultiScaleMelLoss(nn.Module):
    """Mean over scales of L1 between log mel spectrograms. (B, 1, T), (B, 1, T) -> scalar."""

    def __init__(self, sample_rate: int, windows: list[int], n_mels: list[int]):
        super().__init__()
        self.scales = nn.ModuleList(LogMel(sample_rate, w, m) for w, m in zip(windows, n_mels, strict=True))

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return torch.stack([(s(pred) - s(target)).abs().mean() for s in self.scales]).mean()


class MultiResolutionSTFTLoss(nn.Module):
    """Mean over FFT sizes of spectral convergence ``||S - S'||_F / ||S||_F`` plus the L1 of log
    magnitudes (Parallel WaveGAN). (B, 1, T), (B, 1, T) -> scalar."""

    def __init__(self, windows: list[int]):
        super().__init__()
        self.windows = list(windows)
        for w in self.windows:
            self.register_buffer(f"window_{w}", torch.hann_window(w), persistent=False)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        losses = []
        for w in self.windows:
            window = getattr(self, f"window_{w}")
            p, t = magnitude(pred, w, window), magnitude(target, w, window)  # (B, F, N)
            convergence = torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp(min=1e-7)
            log_mag = (p.clamp(min=1e-7).log() - t.clamp(min=1e-7).log()).abs().mean()
            losses.append(convergence + log_mag)
        return torch.stack(losses).mean()
