"""The RVQ audio codec: Fish Audio S2 Pro's modded DAC, in plain PyTorch.

Shape legend: B batch, C channels, T samples or frames (the comment says which), K codebooks,
D latent dim (the quantizer's width), d codebook dim (the low-dimensional VQ space), H heads,
Dh head dim, N codebook size.

How audio flows (every convolution and every attention is causal, so the codec streams)::

    wav (B, 1, T samples)
      -> Encoder: conv, EncoderBlocks (residual units, stride conv, optional transformer)  (B, D, T / hop)
      -> Quantizer.project: strided conv + ConvNeXt per stage, pre transformer      (B, D, T / frame)
      -> semantic VQ (1 codebook), residual VQ on what is left (K - 1 codebooks)    codes (B, K, T / frame)
    codes
      -> Quantizer.decode: sum of code lookups, post transformer, upsampling stages  (B, D, T / hop)
      -> Decoder: conv, DecoderBlocks (transposed conv, residual units), conv, tanh  (B, 1, T samples)

Cheaper stand-ins for small budgets (the CPU demo), each a config switch: ``encoder_type=mel``
(``MelEncoder``: causal log-mel frames at the hop rate, then convs) and ``decoder_type=istft``
(``IStftDecoder``: spectra at the hop rate, inverse FFT, overlap-add).

A frame is ``hop * prod(downsample_factors)`` samples: 2048 at 44.1 kHz (21.5 Hz) for S2 Pro.
``s2train.compat.fish_codec`` loads the released weights into these modules; the quirks it needs
(bf16-rounded RoPE table, cosine code choice with raw-row decode, clamped codes) are the behaviour here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from s2train.checks import check
from s2train.models.layers import FeedForward, RMSNorm, apply_rope, rope_cos_sin

# Carry-over between the chunks of a streaming decode: every stateful layer keeps what it needs from the
# previous chunk (input history, overlap tail, key/value cache, position) under its own module as key.
StreamState = dict[nn.Module, Any]


# ---------------------------------------------------------------------------------------------- config


@dataclass
class CodecConfig:
    """Every size of the codec. ``tiny()`` and ``s2pro()`` below are the two presets."""

    sample_rate: int
    encoder_dim: int  # channels after the first conv; each EncoderBlock doubles them
    encoder_rates: list[int]  # stride of each EncoderBlock; their product is the hop
    encoder_transformer_layers: list[int]  # transformer layers at the end of each EncoderBlock
    decoder_dim: int  # channels after the first decoder conv; each DecoderBlock halves them
    decoder_rates: list[int]  # stride of each DecoderBlock; their product must equal the hop
    downsample_factors: list[int]  # the quantizer's extra stride stages between hop and frame
    semantic_codebook_size: int
    n_residual_codebooks: int
    codebook_size: int  # size of each residual codebook
    codebook_dim: int  # d: the factorised lookup space
    quantizer_dropout: float  # share of a training batch that keeps a random number of residual codebooks
    transformer_layers: int  # the quantizer's pre and post transformers (same shape)
    transformer_heads: int
    transformer_head_dim: int
    transformer_intermediate: int
    transformer_window: int  # frames each position attends to, itself included
    encoder_transformer_head_dim: int = 64  # encoder transformers: heads = dim // this, FFN = 3 * dim
    decoder_type: str = "conv"  # conv: DAC's upsampling decoder (released); istft: spectra at the hop rate
    encoder_type: str = "conv"  # conv: DAC's strided encoder (released); mel: MelEncoder (log-mel)
    encoder_mels: int = 80  # mel encoder: mel bands of its causal STFT (window 4 * hop)
    encoder_residual_units: int = 3  # mel encoder: residual units (dilations 1, 3, 9 in turn; 0 to 3)
    encoder_mel_skip: bool = False  # mel encoder: add a linear map of the log-mel frames to its output
    istft_dim: int = 256  # istft decoder: ConvNeXt width at the hop rate
    istft_layers: int = 4  # istft decoder: ConvNeXt blocks
    istft_phase_advance: bool = False  # istft decoder: turn bin k by 2 pi k / istft_window per hop
    istft_window: int = 2  # istft decoder: each frame's window in hops (2: 50% overlap, 4: 75%)
    encoder_transformer_window: int = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-5  # every transformer RMSNorm

    def __post_init__(self) -> None:
        check(self.sample_rate > 0, f"codec sample_rate must be positive, not {self.sample_rate}")
        check(
            self.encoder_dim > 0 and self.decoder_dim > 0,
            "codec encoder_dim and decoder_dim must be positive",
        )
        for name in ("encoder_rates", "decoder_rates", "downsample_factors"):
            rates = getattr(self, name)
            check(
                len(rates) > 0 and min(rates) >= 1, f"codec {name} must be a non-empty list of strides >= 1"
            )
        check(
            len(self.encoder_transformer_layers) == len(self.encoder_rates),
            f"codec encoder_transformer_layers needs one entry per encoder rate ({len(self.encoder_rates)}), "
            f"got {len(self.encoder_transformer_layers)}",
        )
        check(
            math.prod(self.encoder_rates) == math.prod(self.decoder_rates),
            f"codec encoder_rates {self.encoder_rates} and decoder_rates {self.decoder_rates} must have the "
            "same product, so that decode(encode(x)) has the length of x",
        )
        check(
            self.decoder_dim % 2 ** len(self.decoder_rates) == 0,
            f"codec decoder_dim {self.decoder_dim} must be divisible by 2 ** {len(self.decoder_rates)}, "
            "since each decoder block halves the channels",
        )
        for i, layers in enumerate(self.encoder_transformer_layers):
            dim = self.encoder_dim * 2 ** (i + 1)
            check(
                layers == 0 or dim % self.encoder_transformer_head_dim == 0,
                f"codec encoder block {i} has {dim} channels, not a multiple of encoder_transformer_head_dim "
                f"{self.encoder_transformer_head_dim}",
            )
        for name in ("semantic_codebook_size", "codebook_size"):
            size = getattr(self, name)
            check(
                2 <= size <= 2**16,
                f"codec {name} must be between 2 and 65536 so codes fit uint16, not {size}",
            )
        check(
            self.decoder_type in ("conv", "istft"),
            f"codec decoder_type must be conv or istft, not {self.decoder_type!r}",
        )
        check(
            self.encoder_type in ("conv", "mel"),
            f"codec encoder_type must be conv or mel, not {self.encoder_type!r}",
        )
        check(self.encoder_mels >= 1, f"codec encoder_mels must be at least 1, not {self.encoder_mels}")
        check(
            0 <= self.encoder_residual_units <= 3,
            f"codec encoder_residual_units must be 0 to 3, not {self.encoder_residual_units}",
        )
        check(
            self.istft_dim >= 1 and self.istft_layers >= 0, "codec istft_dim must be >= 1, istft_layers >= 0"
        )
        check(self.istft_window >= 2, f"codec istft_window must be at least 2 hops, not {self.istft_window}")
        check(self.n_residual_codebooks >= 1, "codec n_residual_codebooks must be at least 1")
        check(self.codebook_dim >= 1, "codec codebook_dim must be at least 1")
        check(0.0 <= self.quantizer_dropout <= 1.0, "codec quantizer_dropout must be between 0 and 1")
        check(
            self.transformer_layers >= 0 and self.transformer_heads >= 1 and self.transformer_head_dim >= 1,
            "codec transformer_layers must be >= 0 and transformer_heads, transformer_head_dim >= 1",
        )
        check(
            self.transformer_window >= 1 and self.encoder_transformer_window >= 1,
            "codec transformer windows must be at least 1 frame",
        )

    @property
    def latent_dim(self) -> int:
        """D: the encoder's output channels, which the quantizer and the decoder's input share."""
        return self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def hop_length(self) -> int:
        return math.prod(self.encoder_rates)

    @property
    def samples_per_frame(self) -> int:
        return self.hop_length * math.prod(self.downsample_factors)

    @property
    def n_codebooks(self) -> int:
        """K: the semantic codebook plus the residual ones."""
        return 1 + self.n_residual_codebooks


def tiny() -> CodecConfig:
    """16 kHz, 640 samples per frame (25 Hz), 1 x 64 semantic + 3 x 32 residual codes; builds in milliseconds."""
    return CodecConfig(
        sample_rate=16000,
        encoder_dim=8,
        encoder_rates=[4, 5, 8],
        encoder_transformer_layers=[0, 0, 1],
        decoder_dim=64,
        decoder_rates=[8, 5, 4],
        downsample_factors=[2, 2],
        semantic_codebook_size=64,
        n_residual_codebooks=3,
        codebook_size=32,
        codebook_dim=4,
        quantizer_dropout=0.5,
        transformer_layers=1,
        transformer_heads=2,
        transformer_head_dim=16,
        transformer_intermediate=128,
        transformer_window=4,
        encoder_transformer_head_dim=16,
        encoder_transformer_window=16,
    )


def s2pro() -> CodecConfig:
    """The released S2 Pro codec: 44.1 kHz, 2048 samples per frame, 1 x 4096 semantic + 9 x 1024 residual."""
    return CodecConfig(
        sample_rate=44100,
        encoder_dim=64,
        encoder_rates=[2, 4, 8, 8],
        encoder_transformer_layers=[0, 0, 0, 4],
        decoder_dim=1536,
        decoder_rates=[8, 8, 4, 2],
        downsample_factors=[2, 2],
        semantic_codebook_size=4096,
        n_residual_codebooks=9,
        codebook_size=1024,
        codebook_dim=8,
        quantizer_dropout=0.5,
        transformer_layers=8,
        transformer_heads=16,
        transformer_head_dim=64,
        transformer_intermediate=3072,
        transformer_window=128,
    )


# ---------------------------------------------------------------------------------------- convolutions


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past. (B, C_in, T) -> (B, C_out, ceil(T / stride)).

    With effective kernel K = (k - 1) * dilation + 1 the input is left-padded by K - stride zeros and
    right-padded just enough to complete the last window. Weight norm (g per output channel) by default.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        normed: bool = True,
    ):
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups)
        self.conv = weight_norm(conv) if normed else conv
        self.stride = stride
        self.left_pad = (kernel_size - 1) * dilation + 1 - stride
        assert self.left_pad >= 0, "a causal conv needs kernel >= stride"

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        """(B, C_in, T) -> (B, C_out, ceil(T / stride)); with ``state``, x continues the previous chunk."""
        if state is None:
            return self.conv(F.pad(x, (self.left_pad, -x.shape[-1] % self.stride)))
        assert self.stride == 1, "only stride-1 convolutions stream (the decoder has no other)"
        history = state.get(self, x.new_zeros(x.shape[0], x.shape[1], self.left_pad))
        x = torch.cat([history, x], dim=-1)  # (B, C_in, left_pad + T)
        state[self] = x[..., x.shape[-1] - self.left_pad :]
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """Transposed conv whose last kernel - stride samples are dropped. (B, C_in, T) -> (B, C_out, T * stride).

    Weight norm uses dim 0 of the (C_in, C_out, k) weight, so g is per *input* channel, as released.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, normed: bool = True
    ):
        super().__init__()
        conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        self.conv = weight_norm(conv) if normed else conv
        self.stride = stride
        self.overlap = kernel_size - stride
        assert self.overlap >= 0, "a causal transposed conv needs kernel >= stride"

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        """(B, C_in, T) -> (B, C_out, T * stride); with ``state``, overlap-adds the previous chunk's tail."""
        if state is None:
            y = self.conv(x)  # (B, C_out, T * stride + overlap)
            return y[..., : y.shape[-1] - self.overlap]
        y = F.conv_transpose1d(x, self.conv.weight, None, self.stride)  # (B, C_out, T * stride + overlap)
        if self in state:
            y = torch.cat([y[..., : self.overlap] + state[self], y[..., self.overlap :]], dim=-1)
        n = x.shape[-1] * self.stride
        state[self] = y[..., n:]  # (B, C_out, overlap): the next chunk's first samples receive it
        return y[..., :n] + self.conv.bias[:, None]


# ---------------------------------------------------------------------------------- encoder and decoder


class _SnakeFunction(torch.autograd.Function):
    """Snake with a hand-written backward that keeps only x: autograd's version stores five
    activation-sized intermediates and runs as many elementwise kernels, which dominates a CPU step.

    y = x + sin(a x)^2 / a;  dy/dx = 1 + sin(2 a x);  dy/da = x sin(2 a x) / a - sin(a x)^2 / a^2.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor) -> Tensor:
        ctx.save_for_backward(x, alpha)
        inv = (alpha + 1e-9).reciprocal()
        return torch.addcmul(x, inv, torch.sin(alpha * x).square())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, alpha = ctx.saved_tensors
        inv = (alpha + 1e-9).reciprocal()
        ax = alpha * x
        sin2 = torch.sin(2 * ax)
        grad_x = grad + grad * sin2 if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            d_alpha = inv * (x * sin2 - inv * torch.sin(ax).square())
            grad_alpha = (grad * d_alpha).sum(dim=(0, 2), keepdim=True)
        return grad_x, grad_alpha


class Snake(nn.Module):
    """x + sin(alpha x)^2 / alpha, with a learned alpha per channel. (B, C, T) -> (B, C, T)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return _SnakeFunction.apply(x, self.alpha)


class ResidualUnit(nn.Module):
    """x + conv1x1(Snake(conv7_dilated(Snake(x)))). (B, C, T) -> (B, C, T)."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.act1 = Snake(channels)
        self.conv1 = CausalConv1d(channels, channels, 7, dilation=dilation)
        self.act2 = Snake(channels)
        self.conv2 = CausalConv1d(channels, channels, 1)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), state)), state)


class EncoderBlock(nn.Module):
    """Residual units (dilations 1, 3, 9), Snake, stride conv doubling the channels, optional transformer.

    (B, C/2, T) -> (B, C, T / stride)
    """

    def __init__(self, channels: int, stride: int, transformer: WindowTransformer | None):
        super().__init__()
        self.res_units = nn.ModuleList(ResidualUnit(channels // 2, d) for d in (1, 3, 9))
        self.act = Snake(channels // 2)
        self.down = CausalConv1d(channels // 2, channels, 2 * stride, stride=stride)
        self.transformer = transformer

    def forward(self, x: Tensor) -> Tensor:
        for unit in self.res_units:
            x = unit(x)
        x = self.down(self.act(x))
        return x if self.transformer is None else self.transformer(x)


class Encoder(nn.Module):
    """(B, 1, T samples) -> (B, D, T / hop)."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.conv_in = CausalConv1d(1, cfg.encoder_dim, 7)
        blocks = []
        for i, (stride, n_layers) in enumerate(zip(cfg.encoder_rates, cfg.encoder_transformer_layers)):
            dim = cfg.encoder_dim * 2 ** (i + 1)
            transformer = None
            if n_layers > 0:
                # Released behaviour: heads = dim // 64 (the head dim), FFN 3 * dim, window 512.
                transformer = WindowTransformer(
                    dim=dim,
                    n_layers=n_layers,
                    n_heads=dim // cfg.encoder_transformer_head_dim,
                    head_dim=cfg.encoder_transformer_head_dim,
                    intermediate=3 * dim,
                    window=cfg.encoder_transformer_window,
                    rope_base=cfg.rope_base,
                    norm_eps=cfg.norm_eps,
                )
            blocks.append(EncoderBlock(dim, stride, transformer))
        self.blocks = nn.ModuleList(blocks)
        self.act_out = Snake(cfg.latent_dim)
        self.conv_out = CausalConv1d(cfg.latent_dim, cfg.latent_dim, 3)

    def forward(self, wav: Tensor) -> Tensor:
        x = self.conv_in(wav)  # (B, encoder_dim, T)
        for block in self.blocks:
            x = block(x)
        return self.conv_out(self.act_out(x))  # (B, D, T / hop)


class MelEncoder(nn.Module):
    """(B, 1, T samples) -> (B, D, T / hop) through a fixed log-mel front end.

    A causal STFT (periodic Hann window of 4 * hop samples ending where each hop ends) and a Slaney mel
    filterbank give log-mel frames at the hop rate; a weight-normed conv, ``encoder_residual_units``
    residual units with Snake (dilations 1, 3, 9) and a closing conv map them to the latent. With
    ``encoder_mel_skip`` a linear map (1 x 1 conv) of the log-mel frames is added to that: the latent
    starts as a projection of the spectrum, which a decoder learns to speak from within minutes, and the
    convs learn what to add. Nothing runs at the audio rate, so a CPU trains it many times faster than
    the strided encoder; the demo uses it (``encoder_type=mel``), the released S2 Pro codec the strided one.
    """

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        from torchaudio.functional import melscale_fbanks

        self.hop = cfg.hop_length
        self.n_fft = 4 * self.hop
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True), persistent=False)
        fbank = melscale_fbanks(
            self.n_fft // 2 + 1, 0.0, cfg.sample_rate / 2, cfg.encoder_mels, cfg.sample_rate, norm="slaney"
        )
        self.register_buffer("fbank", fbank.T.contiguous(), persistent=False)  # (M, F)
        dim = cfg.latent_dim
        self.conv_in = CausalConv1d(cfg.encoder_mels, dim, 7)
        self.res_units = nn.ModuleList(ResidualUnit(dim, d) for d in (1, 3, 9)[: cfg.encoder_residual_units])
        self.act_out = Snake(dim)
        self.conv_out = CausalConv1d(dim, dim, 3)
        self.skip = nn.Conv1d(cfg.encoder_mels, dim, 1) if cfg.encoder_mel_skip else None

    def log_mel(self, wav: Tensor) -> Tensor:
        """(B, 1, T samples), T a multiple of hop -> log10 mel magnitudes (B, M, T / hop), floor -5."""
        padded = F.pad(wav[:, 0].float(), (self.n_fft - self.hop, 0))  # frame t ends at hop t's end
        spec = torch.stft(
            padded, self.n_fft, self.hop, window=self.window, center=False, return_complex=True
        )  # (B, F, T / hop)
        return (self.fbank @ spec.abs()).clamp(min=1e-5).log10()

    def forward(self, wav: Tensor) -> Tensor:
        # Silence (-5) to loud speech (about 0) mapped to about -1 .. 1: Snake's period is about 3 at
        # alpha 1, so inputs many times larger make its output and gradients erratic.
        features = (self.log_mel(wav) + 2.5) / 2.5
        features = features.to(wav.dtype)
        x = self.conv_in(features)  # (B, D, T / hop)
        for unit in self.res_units:
            x = unit(x)
        x = self.conv_out(self.act_out(x))
        return x if self.skip is None else x + self.skip(features)


class DecoderBlock(nn.Module):
    """Snake, transposed conv (kernel 2 * stride) halving the channels, residual units (1, 3, 9).

    (B, C, T) -> (B, C/2, T * stride)
    """

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.act = Snake(channels)
        self.up = CausalConvTranspose1d(channels, channels // 2, 2 * stride, stride)
        self.res_units = nn.ModuleList(ResidualUnit(channels // 2, d) for d in (1, 3, 9))

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        x = self.up(self.act(x), state)
        for unit in self.res_units:
            x = unit(x, state)
        return x


class Decoder(nn.Module):
    """(B, D, T / hop) -> (B, 1, T samples) in [-1, 1]."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.conv_in = CausalConv1d(cfg.latent_dim, cfg.decoder_dim, 7)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.decoder_dim // 2**i, stride) for i, stride in enumerate(cfg.decoder_rates)
        )
        out_dim = cfg.decoder_dim // 2 ** len(cfg.decoder_rates)
        self.act_out = Snake(out_dim)
        self.conv_out = CausalConv1d(out_dim, 1, 7)

    def forward(self, latent: Tensor, state: StreamState | None = None) -> Tensor:
        x = self.conv_in(latent, state)  # (B, decoder_dim, T / hop)
        for block in self.blocks:
            x = block(x, state)
        return torch.tanh(self.conv_out(self.act_out(x), state))  # (B, 1, T)


# ------------------------------------------------------------------------------ window-limited transformer


class Attention(nn.Module):
    """Causal self-attention over the last ``window`` positions, RoPE on q and k. (B, T, C) -> (B, T, C)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, window: int):
        super().__init__()
        self.n_heads, self.head_dim, self.window = n_heads, head_dim, window
        self.wqkv = nn.Linear(dim, 3 * n_heads * head_dim, bias=False)  # rows: q, then k, then v
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], state: StreamState | None = None
    ) -> Tensor:
        q, k, v = self.wqkv(x).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(2)  # (B, T, H, Dh) each
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        key_positions = positions  # (S,)
        if state is not None:
            if self in state:
                k_past, v_past, positions_past = state[self]
                k, v = torch.cat([k_past, k], dim=1), torch.cat([v_past, v], dim=1)  # (B, S, H, Dh)
                key_positions = torch.cat([positions_past, positions])
            start = k.shape[1] - min(k.shape[1], self.window - 1)
            state[self] = (k[:, start:], v[:, start:], key_positions[start:])
        distance = positions[:, None] - key_positions[None, :]  # (T, S)
        mask = (distance >= 0) & (distance < self.window)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.wo(out.transpose(1, 2).flatten(2))  # (B, T, C)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch. (..., C) -> (..., C)."""

    def __init__(self, dim: int, init: float = 1e-2):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * x


class TransformerBlock(nn.Module):
    """Pre-norm block with layer-scaled residual branches. (B, T, C) -> (B, T, C)."""

    def __init__(
        self, dim: int, n_heads: int, head_dim: int, intermediate: int, window: int, norm_eps: float
    ):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_heads, head_dim, window)
        self.attention_layer_scale = LayerScale(dim)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, intermediate)
        self.ffn_layer_scale = LayerScale(dim)

    def forward(
        self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], state: StreamState | None = None
    ) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), positions, rope, state))
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))


class WindowTransformer(nn.Module):
    """Channels-first causal transformer with a window-limited mask. (B, C, T frames) -> (B, C, T frames).

    It ends with a final RMSNorm and has no outer residual, so its output is RMS-normalised (released
    behaviour). Positions count from 0 on every call; a streaming call continues them.
    """

    def __init__(
        self,
        dim: int,
        n_layers: int,
        n_heads: int,
        head_dim: int,
        intermediate: int,
        window: int,
        rope_base: float,
        norm_eps: float,
    ):
        super().__init__()
        self.head_dim, self.rope_base = head_dim, rope_base
        self.layers = nn.ModuleList(
            TransformerBlock(dim, n_heads, head_dim, intermediate, window, norm_eps) for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        start = 0 if state is None else state.get(self, 0)
        positions = torch.arange(start, start + x.shape[-1], device=x.device)  # (T,)
        if state is not None:
            state[self] = start + x.shape[-1]
        rope = rope_cos_sin(positions, self.head_dim, self.rope_base)  # rounded through bf16, as released
        h = x.transpose(1, 2)  # (B, T, C)
        for layer in self.layers:
            h = layer(h, positions, rope, state)
        return self.norm(h).transpose(1, 2)  # (B, C, T)


# ------------------------------------------------------------------------------------------- quantizer


class ConvNeXtBlock(nn.Module):
    """x + gamma * pw2(gelu(pw1(LayerNorm(causal depthwise conv7(x))))). (B, C, T) -> (B, C, T)."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, 7, groups=dim, normed=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        y = self.norm(self.dwconv(x, state).transpose(1, 2))  # (B, T, C)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.transpose(1, 2)


class IStftDecoder(nn.Module):
    """(B, D, T / hop) -> (B, 1, T samples) without a layer at the audio rate (Vocos-style).

    ConvNeXt blocks at the hop rate predict, for every hop t, the log-magnitude and phase of a window of
    W = ``istft_window`` hops that ends where hop t ends; an inverse FFT, a periodic Hann window and
    overlap-add (divided by W / 2, what the windows sum to) give the waveform. Hop t's samples come from
    frames t .. t + W - 1, so a stream releases each hop W - 1 frames later and ``flush`` gives the last
    W - 1 hops; one-shot decoding leaves the (absent) frames after T out the same way.

    A longer window resolves a low voice's harmonics (W = 4 at a 10 ms hop: 25 Hz bins); W = 2 keeps the
    latency to one hop. Far cheaper than the upsampling decoder on a CPU, and it learns intelligible
    speech in minutes, which the demo needs; the released S2 Pro codec uses ``decoder_type=conv``.
    """

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.hop, self.hops = cfg.hop_length, cfg.istft_window
        self.n_fft = self.hops * self.hop
        self.conv_in = CausalConv1d(cfg.latent_dim, cfg.istft_dim, 7)
        scale = 1.0 / max(1, cfg.istft_layers)
        self.blocks = nn.ModuleList(ConvNeXtBlock(cfg.istft_dim, scale) for _ in range(cfg.istft_layers))
        self.norm = nn.LayerNorm(cfg.istft_dim, eps=1e-6)
        bins = self.n_fft // 2 + 1
        self.head = nn.Linear(cfg.istft_dim, 2 * bins)  # log-magnitude and phase of every bin
        window = torch.hann_window(self.n_fft, periodic=True) / (self.hops / 2)  # overlap-add sums to 1
        self.register_buffer("window", window, persistent=False)
        self.phase_advance = cfg.istft_phase_advance

    def frames(self, latent: Tensor, state: StreamState | None = None) -> Tensor:
        """(B, D, T) -> windowed frames (B, T, W * hop)."""
        x = self.conv_in(latent, state)
        for block in self.blocks:
            x = block(x, state)
        x = self.head(self.norm(x.transpose(1, 2)))  # (B, T, 2 * bins)
        log_magnitude, phase = x.float().chunk(2, dim=-1)
        if self.phase_advance:
            # A steady sinusoid at bin k's centre advances 2 pi k / W per hop. The layers above are the
            # same at every hop, so without this a steady input makes the same frame every hop: a buzz at
            # the hop rate's harmonics. With it, a steady output is a steady sum of bin centres.
            start = 0 if state is None else state.get(self.head, 0)  # hops decoded before (head: the key)
            if state is not None:
                state[self.head] = start + x.shape[1]
            t = torch.arange(start, start + x.shape[1], device=x.device)  # (T,)
            k = torch.arange(log_magnitude.shape[-1], device=x.device)  # (bins,)
            turns = (t[:, None] * k[None, :]) % self.hops  # (T, bins), broadcast over B
            phase = phase + (2 * math.pi / self.hops) * turns
        spectrum = torch.polar(log_magnitude.clamp(max=8.0).exp(), phase)  # (B, T, bins)
        return torch.fft.irfft(spectrum, n=self.n_fft) * self.window  # (B, T, W * hop)

    def overlap_add(self, frames: Tensor) -> Tensor:
        """(B, T, W * hop) -> (B, (T + W - 1) * hop): frame t's window starts at hop t."""
        B, T, _ = frames.shape
        folded = F.fold(
            frames.transpose(1, 2),  # (B, W * hop, T)
            output_size=(1, (T + self.hops - 1) * self.hop),
            kernel_size=(1, self.n_fft),
            stride=(1, self.hop),
        )
        return folded.view(B, -1)

    def forward(self, latent: Tensor, state: StreamState | None = None) -> Tensor:
        frames = self.frames(latent, state)
        lead = (self.hops - 1) * self.hop  # frame 0 starts W - 1 hops before hop 0
        summed = self.overlap_add(frames)  # (B, (T + W - 1) * hop)
        if state is None:
            return summed[:, None, lead:].to(latent.dtype)  # the last W - 1 hops lack their later frames
        # Streaming: ``pending`` holds the partial sums of the next W - 1 hops, ``skip`` the samples of
        # the stream's first frames that lie before hop 0 and are never released.
        carry = state.get(self) or {"pending": summed.new_zeros(summed.shape[0], lead), "skip": lead}
        summed = torch.cat([summed[:, :lead] + carry["pending"], summed[:, lead:]], dim=1)
        cut = summed.shape[1] - lead
        out, carry["pending"] = summed[:, :cut], summed[:, cut:]
        dropped = min(carry["skip"], cut)
        carry["skip"] -= dropped
        state[self] = carry
        return out[:, None, dropped:].to(latent.dtype)  # (B, 1, released samples)

    def flush(self, state: StreamState) -> Tensor | None:
        """The last W - 1 hops of a stream (B, 1, (W - 1) * hop), or None when nothing is pending."""
        carry = state.pop(self, None)
        return None if carry is None else carry["pending"][:, None, carry["skip"] :]


class DownsampleStage(nn.Module):
    """Causal conv (kernel = stride = factor), then ConvNeXt. (B, D, T) -> (B, D, ceil(T / factor))."""

    def __init__(self, dim: int, factor: int):
        super().__init__()
        self.conv = CausalConv1d(dim, dim, factor, stride=factor, normed=False)
        self.convnext = ConvNeXtBlock(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.convnext(self.conv(x))


class UpsampleStage(nn.Module):
    """Transposed conv (kernel = stride = factor), then ConvNeXt. (B, D, T) -> (B, D, T * factor)."""

    def __init__(self, dim: int, factor: int):
        super().__init__()
        self.conv = CausalConvTranspose1d(dim, dim, factor, factor, normed=False)
        self.convnext = ConvNeXtBlock(dim)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        return self.convnext(self.conv(x, state), state)


class VectorQuantizer(nn.Module):
    """One codebook, looked up in a low-dimensional space (DAC's factorised codes).

    in_proj (1x1 conv, D -> d) gives z_e; the code is the codebook row of highest cosine similarity with
    z_e (both l2-normalised); the quantised vector is the *raw* row, mapped back by out_proj (d -> D).
    In training it counts code usage and keeps recent z_e rows for ``restart_dead_codes``.
    """

    max_recent = 4096  # z_e rows kept for dead-code restarts

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.in_proj = weight_norm(nn.Conv1d(dim, codebook_dim, 1))
        self.out_proj = weight_norm(nn.Conv1d(codebook_dim, dim, 1))
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.register_buffer("usage", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        self.register_buffer("recent", torch.zeros(0, codebook_dim), persistent=False)

    def nearest(self, z_e: Tensor) -> Tensor:
        """Codes (B, T) of the codebook rows closest in cosine to z_e (B, d, T)."""
        e = F.normalize(z_e.transpose(1, 2), dim=-1)  # (B, T, d)
        c = F.normalize(self.codebook.weight, dim=-1)  # (N, d)
        return (e @ c.T).argmax(-1)

    def decode(self, codes: Tensor) -> Tensor:
        """(B, T) codes in range -> (B, D, T): out_proj of the raw codebook rows."""
        return self.out_proj(self.codebook(codes).transpose(1, 2))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """z (B, D, T) -> quantised (B, D, T), codes (B, T), commitment and codebook losses (B,).

        Gradients reach the encoder through the straight-through estimator in the d space.
        """
        z_e = self.in_proj(z)  # (B, d, T)
        codes = self.nearest(z_e)  # (B, T)
        z_q = self.codebook(codes).transpose(1, 2)  # (B, d, T)
        commitment = F.mse_loss(z_e, z_q.detach(), reduction="none").mean((1, 2))
        codebook = F.mse_loss(z_q, z_e.detach(), reduction="none").mean((1, 2))
        if self.training:
            self.usage += torch.bincount(codes.flatten(), minlength=self.usage.numel())
            rows = z_e.detach().transpose(1, 2).flatten(0, 1).to(self.recent.dtype)  # (B * T, d)
            self.recent = torch.cat([self.recent, rows])[-self.max_recent :]
        z_q = z_e + (z_q - z_e).detach()
        return self.out_proj(z_q), codes, commitment, codebook

    @torch.no_grad()
    def init_from_recent(self) -> None:
        """Data-dependent init: centre z_e (shift in_proj's bias by minus the mean of the recent z_e rows)
        and make every codebook row one of those centred rows.

        A young encoder's output is dominated by a constant offset (the frames' z_e have cosine
        similarity near 1), so under a cosine code choice one code wins every frame and the codebook
        collapses; centred, the frames spread over the codes."""
        if self.recent.shape[0] == 0:
            raise ValueError("no encoder outputs were recorded: run training forward passes before an init")
        mean = self.recent.mean(0)  # (d,)
        self.in_proj.bias -= mean.to(self.in_proj.bias.dtype)
        self.recent = self.recent - mean
        self.restart_dead_codes(min_usage=2**62)

    @torch.no_grad()
    def restart_dead_codes(self, min_usage: int = 1) -> int:
        """Replace the rows used fewer than ``min_usage`` times since the last restart by random recent
        z_e rows; reset the counts. Returns how many rows were replaced."""
        if self.recent.shape[0] == 0:
            raise ValueError("no encoder outputs were recorded: run training forward passes before a restart")
        dead = (self.usage < min_usage).nonzero().squeeze(1)  # (n_dead,)
        picks = torch.randint(self.recent.shape[0], (dead.numel(),), device=self.recent.device)
        self.codebook.weight[dead] = self.recent[picks].to(self.codebook.weight.dtype)
        self.usage.zero_()
        return dead.numel()


class Quantizer(nn.Module):
    """Frame-rate reduction, a semantic VQ and residual VQs, and the way back to the hop rate.

    The semantic codebook quantises the pre-transformer output z; the residual codebooks quantise
    z minus the semantic reconstruction, each stage subtracting its own reconstruction.
    """

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        dim = cfg.latent_dim
        self.n_residual = cfg.n_residual_codebooks
        self.dropout = cfg.quantizer_dropout
        self.downsample = nn.ModuleList(DownsampleStage(dim, f) for f in cfg.downsample_factors)
        transformer_args = dict(
            dim=dim,
            n_layers=cfg.transformer_layers,
            n_heads=cfg.transformer_heads,
            head_dim=cfg.transformer_head_dim,
            intermediate=cfg.transformer_intermediate,
            window=cfg.transformer_window,
            rope_base=cfg.rope_base,
            norm_eps=cfg.norm_eps,
        )
        self.pre_transformer = WindowTransformer(**transformer_args)
        self.semantic = VectorQuantizer(dim, cfg.semantic_codebook_size, cfg.codebook_dim)
        self.residual = nn.ModuleList(
            VectorQuantizer(dim, cfg.codebook_size, cfg.codebook_dim) for _ in range(cfg.n_residual_codebooks)
        )
        self.post_transformer = WindowTransformer(**transformer_args)
        self.upsample = nn.ModuleList(UpsampleStage(dim, f) for f in reversed(cfg.downsample_factors))

    def project(self, latent: Tensor) -> Tensor:
        """Encoder output (B, D, T / hop) -> the semantic VQ input z (B, D, T / frame)."""
        for stage in self.downsample:
            latent = stage(latent)
        return self.pre_transformer(latent)

    def quantize(self, z: Tensor, n_residual: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """z (B, D, T) -> quantised (B, D, T) summed over the semantic and the first ``n_residual`` (B,)
        residual codebooks of each item, codes of all K codebooks (B, K, T), and the commitment and
        codebook losses (scalars; a dropped codebook does not count for that item)."""
        z_q, codes, commitment, codebook = self.semantic(z)
        residual = z - z_q
        all_codes = [codes]
        for i, vq in enumerate(self.residual):
            r_q, codes, commitment_i, codebook_i = vq(residual)
            keep = (i < n_residual).to(z.dtype)  # (B,)
            z_q = z_q + r_q * keep[:, None, None]
            residual = residual - r_q
            commitment = commitment + commitment_i * keep
            codebook = codebook + codebook_i * keep
            all_codes.append(codes)
        return z_q, torch.stack(all_codes, dim=1), commitment.mean(), codebook.mean()

    def forward(self, latent: Tensor, bypass: bool = False) -> dict[str, Tensor]:
        """Training pass on the encoder output (B, D, T / hop).

        Returns ``latent`` (the decoder input, B, D, T / hop), ``codes`` (B, K, T / frame),
        ``commitment_loss``, ``codebook_loss`` and ``codebooks_used`` (B,). In training mode a
        ``quantizer_dropout`` share of the items keeps only 1..K-1 residual codebooks (uniform); in eval
        every item keeps all of them. With ``bypass`` the decoder gets z itself, unquantised, and both VQ
        losses are zero; the codes are still chosen (and usage and recent z_e rows recorded in training),
        so that ``init_from_recent`` afterwards starts the codebooks from an encoder that already carries
        the audio.
        """
        z = self.project(latent)
        if bypass:
            codes = self.quantize(z, torch.full((z.shape[0],), self.n_residual, device=z.device))[1]
            zero = z.new_zeros(())
            return {
                "latent": self.upsample_frames(self.post_transformer(z)),
                "codes": codes,
                "commitment_loss": zero,
                "codebook_loss": zero,
                "codebooks_used": torch.full((z.shape[0],), 1 + self.n_residual, device=z.device),
            }
        batch = z.shape[0]
        n_residual = torch.full((batch,), self.n_residual, device=z.device)
        if self.training and self.dropout > 0:
            dropped = torch.rand(batch, device=z.device) < self.dropout
            drawn = torch.randint(1, self.n_residual + 1, (batch,), device=z.device)
            n_residual = torch.where(dropped, drawn, n_residual)
        z_q, codes, commitment, codebook = self.quantize(z, n_residual)
        return {
            "latent": self.upsample_frames(self.post_transformer(z_q)),
            "codes": codes,
            "commitment_loss": commitment,
            "codebook_loss": codebook,
            "codebooks_used": 1 + n_residual,
        }

    def encode(self, latent: Tensor) -> Tensor:
        """Encoder output (B, D, T / hop) -> codes (B, K, T / frame) of every codebook."""
        z = self.project(latent)
        n_residual = torch.full((z.shape[0],), self.n_residual, device=z.device)
        return self.quantize(z, n_residual)[1]

    def embed(self, codes: Tensor) -> Tensor:
        """Codes (B, K', T) of the first K' <= K codebooks -> the sum of their reconstructions (B, D, T).

        Codes above a codebook's last index are clamped to it (an LM may emit a semantic-sized code in a
        residual row). Upstream clamps in place on the caller's tensor; here the caller's codes stay as given.
        """
        x = self.semantic.decode(codes[:, 0].clamp(max=self.semantic.codebook.num_embeddings - 1))
        for i, vq in enumerate(self.residual[: codes.shape[1] - 1]):
            x = x + vq.decode(codes[:, i + 1].clamp(max=vq.codebook.num_embeddings - 1))
        return x

    def upsample_frames(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        """(B, D, T / frame) -> (B, D, T / hop)."""
        for stage in self.upsample:
            x = stage(x, state)
        return x

    def decode(self, codes: Tensor, state: StreamState | None = None) -> Tensor:
        """Codes (B, K', T / frame) -> the decoder input (B, D, T / hop)."""
        return self.upsample_frames(self.post_transformer(self.embed(codes), state), state)

    def restart_dead_codes(self, min_usage: int = 1) -> int:
        """``VectorQuantizer.restart_dead_codes`` on every codebook; returns the rows replaced in all."""
        return sum(vq.restart_dead_codes(min_usage) for vq in [self.semantic, *self.residual])

    def init_from_recent(self) -> None:
        """``VectorQuantizer.init_from_recent`` on every codebook (after training forward passes)."""
        for vq in [self.semantic, *self.residual]:
            vq.init_from_recent()


# ----------------------------------------------------------------------------------------------- codec


class Codec(nn.Module):
    """Waveform <-> codes. ``encode``/``decode`` for inference, ``forward`` for training,
    ``stream_decoder`` for chunked decoding that equals one-shot decoding."""

    def __init__(self, config: CodecConfig):
        super().__init__()
        self.config = config
        self.encoder = MelEncoder(config) if config.encoder_type == "mel" else Encoder(config)
        self.quantizer = Quantizer(config)
        self.decoder = IStftDecoder(config) if config.decoder_type == "istft" else Decoder(config)

    @property
    def samples_per_frame(self) -> int:
        return self.config.samples_per_frame

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return self.config.sample_rate / self.config.samples_per_frame

    def _padded_batch(self, wav: Tensor) -> Tensor:
        """(T,), (B, T) or (B, 1, T) -> (B, 1, T'), right-padded with zeros to a whole number of frames."""
        if wav.dim() == 1:
            wav = wav[None, None]
        elif wav.dim() == 2:
            wav = wav[:, None]
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(
                f"the codec takes mono audio shaped (T,), (B, T) or (B, 1, T), not {tuple(wav.shape)}"
            )
        if wav.shape[-1] == 0:
            raise ValueError("the codec cannot encode empty audio")
        return F.pad(wav, (0, -wav.shape[-1] % self.samples_per_frame))

    def _batched_codes(self, codes: Tensor) -> Tensor:
        """(K', T) or (B, K', T) integer codes -> (B, K', T), checked against the codebooks."""
        if codes.dim() == 2:
            codes = codes[None]
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.config.n_codebooks:
            raise ValueError(
                f"codes must be shaped (K, T) or (B, K, T) with 1 <= K <= {self.config.n_codebooks}, "
                f"not {tuple(codes.shape)}"
            )
        if codes.is_floating_point():
            raise ValueError(f"codes must be integers, not {codes.dtype}")
        return codes.long()

    @torch.no_grad()
    def encode(self, wav: Tensor, sample_rate: int) -> Tensor:
        """Audio (T,), (B, T) or (B, 1, T) at the codec's rate -> codes (K, T') or (B, K, T') as int64,
        T' = ceil(T / samples_per_frame). Resample before calling: another rate is a ValueError."""
        if sample_rate != self.config.sample_rate:
            raise ValueError(
                f"audio at {sample_rate} Hz given to a {self.config.sample_rate} Hz codec; resample it first"
            )
        codes = self.quantizer.encode(self.encoder(self._padded_batch(wav)))  # (B, K, T')
        return codes[0] if wav.dim() == 1 else codes

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (K, T) or (B, K, T) -> audio (B, 1, T * samples_per_frame); K may be fewer than all."""
        return self.decoder(self.quantizer.decode(self._batched_codes(codes)))

    def forward(self, wav: Tensor, bypass_quantizer: bool = False) -> dict[str, Tensor]:
        """Training pass on audio (B, 1, T) or (B, T) at the codec's rate.

        Returns ``audio`` (the reconstruction, B, 1, T), ``codes`` (B, K, T'), ``commitment_loss``,
        ``codebook_loss`` and ``codebooks_used`` (B,) (see ``Quantizer.forward``, also for
        ``bypass_quantizer``).
        """
        length = wav.shape[-1]
        out = self.quantizer(self.encoder(self._padded_batch(wav)), bypass=bypass_quantizer)
        out["audio"] = self.decoder(out.pop("latent"))[..., :length]
        return out

    def restart_dead_codes(self, min_usage: int = 1) -> int:
        """Replace codes used fewer than ``min_usage`` times since the last restart by recent encoder
        outputs (see ``VectorQuantizer``). The optimizer's moments for those rows are left as they are."""
        return self.quantizer.restart_dead_codes(min_usage)

    def stream_decoder(self) -> StreamingDecoder:
        """A decoder that takes codes chunk by chunk and returns each chunk's audio."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """Chunked ``Codec.decode``: pushing codes (B, K, t) chunk by chunk returns each chunk's audio, and the
    chunks concatenated (then ``flush()``, which the istft decoder needs) equal one ``decode`` of the whole
    stream (allclose).

    Each causal layer carries its input history, transposed-conv tail or key/value window across chunks,
    so the batch size must stay the same for one stream.
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self.state: StreamState = {}

    def push(self, codes: Tensor) -> Tensor:
        """Codes (K, t) or (B, K, t) -> the audio these frames complete, (B, 1, samples): t *
        samples_per_frame with the conv decoder; with the istft one a hop less in the first chunk, which
        ``flush`` returns at the end."""
        codes = self.codec._batched_codes(codes)
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], 1, 0, device=codes.device)
        latent = self.codec.quantizer.decode(codes, self.state)
        return self.codec.decoder(latent, self.state)

    def flush(self) -> Tensor | None:
        """The audio still held back at the end of the stream (istft decoder), or None."""
        flush = getattr(self.codec.decoder, "flush", None)
        return flush(self.state) if flush is not None else None


# ------------------------------------------------------------------------------------------ checkpoints
