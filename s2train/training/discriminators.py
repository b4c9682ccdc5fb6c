"""GAN discriminators of the codec and their losses, in plain PyTorch.

Shape legend: B batch, T samples, C channels, F frequency bins, N STFT frames, P period.
Every discriminator maps a waveform (B, 1, T) to ``(logits, features)``: the logits of its last layer and
the activations of every earlier layer, which feature matching compares between real and generated audio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from s2train.training.audio_losses import magnitude

DiscOutput = tuple[Tensor, list[Tensor]]  # logits, features


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's period discriminator: the waveform folded into (B, 1, T / P, P), 2-D convs along time."""

    def __init__(self, period: int, width: int):
        super().__init__()
        self.period = period
        channels = [1, width, 4 * width, 16 * width, 32 * width]
        self.convs = nn.ModuleList(
            weight_norm(nn.Conv2d(c_in, c_out, (5, 1), (3, 1), padding=(2, 0)))
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.convs.append(weight_norm(nn.Conv2d(channels[-1], channels[-1], (5, 1), padding=(2, 0))))
        self.out = weight_norm(nn.Conv2d(channels[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, wav: Tensor) -> DiscOutput:
        x = F.pad(wav, (0, -wav.shape[-1] % self.period), mode="reflect")  # (B, 1, T')
        x = x.reshape(x.shape[0], 1, -1, self.period)  # (B, 1, T' / P, P)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        return self.out(x), features


class STFTDiscriminator(nn.Module):
    """UnivNet's resolution discriminator: 2-D convs over the magnitude spectrogram (B, 1, N, F)."""

    def __init__(self, n_fft: int, width: int):
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList(
            [
                weight_norm(nn.Conv2d(1, width, (3, 9), padding=(1, 4))),
                *(weight_norm(nn.Conv2d(width, width, (3, 9), (1, 2), padding=(1, 4))) for _ in range(3)),
                weight_norm(nn.Conv2d(width, width, (3, 3), padding=(1, 1))),
            ]
        )
        self.out = weight_norm(nn.Conv2d(width, 1, (3, 3), padding=(1, 1)))

    def forward(self, wav: Tensor) -> DiscOutput:
        x = magnitude(wav, self.n_fft, self.window).transpose(1, 2)[:, None]  # (B, 1, N, F)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            features.append(x)
        return self.out(x), features


class Discriminator(nn.Module):
    """A multi-period discriminator plus a multi-resolution STFT discriminator.
    (B, 1, T) -> one ``(logits, features)`` per sub-discriminator."""

    def __init__(self, periods: list[int], stft_windows: list[int], width: int):
        super().__init__()
        self.discriminators = nn.ModuleList(
            [
                *(PeriodDiscriminator(p, width) for p in periods),
                *(STFTDiscriminator(w, width) for w in stft_windows),
            ]
        )

    def forward(self, wav: Tensor) -> list[DiscOutput]:
        return [d(wav) for d in self.discriminators]


# ---------------------------------------------------------------------------------------------- losses


def discriminator_loss(real: list[DiscOutput], fake: list[DiscOutput], kind: str) -> Tensor:
    """Mean over discriminators of hinge ``relu(1 - D(x)) + relu(1 + D(G(z)))`` or LSGAN
    ``(1 - D(x))^2 + D(G(z))^2``, each averaged over its logits. ``fake`` must be detached from G."""
    losses = []
    for (r, _), (f, _) in zip(real, fake, strict=True):
        if kind == "hinge":
            losses.append(F.relu(1 - r).mean() + F.relu(1 + f).mean())
        else:
            losses.append((1 - r).pow(2).mean() + f.pow(2).mean())
    return torch.stack(losses).mean()


def generator_loss(fake: list[DiscOutput], kind: str) -> Tensor:
    """Mean over discriminators of hinge ``relu(1 - D(G(z)))`` or LSGAN ``(1 - D(G(z)))^2``."""
    losses = [F.relu(1 - f).mean() if kind == "hinge" else (1 - f).pow(2).mean() for f, _ in fake]
    return torch.stack(losses).mean()


def feature_matching_loss(real: list[DiscOutput], fake: list[DiscOutput]) -> Tensor:
    """Mean over discriminators and layers of L1 between the features of real and generated audio."""
    losses = [
        (f - r.detach()).abs().mean()
        for (_, real_feats), (_, fake_feats) in zip(real, fake, strict=True)
        for r, f in zip(real_feats, fake_feats, strict=True)
    ]
    return torch.stack(losses).mean()
