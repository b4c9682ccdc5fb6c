"""Seed-TTS-Eval speaker similarity (SIM): WavLM-Large hidden states into an ECAPA-TDNN head.

This is the model behind the SIM column of Seed-TTS-Eval: Microsoft UniSpeech's speaker-verification
``ECAPA_TDNN_SMALL(feat_dim=1024, emb_dim=256, feat_type='wavlm_large')`` with its fine-tuned checkpoint
``wavlm_large_finetune.pth``. Upstream takes WavLM-Large from s3prl's torch hub and then overwrites it
with the checkpoint's ``feature_extract.*`` entries (``load_state_dict(state['model'], strict=False)``);
here the same module tree is written in plain PyTorch under the same parameter names, so that file loads
into it one to one and no download is needed:

    feature_extract.model.feature_extractor.conv_layers.{i}.0.weight     conv (no bias)
    feature_extract.model.feature_extractor.conv_layers.{i}.2.1.{weight,bias}  its layer norm
    feature_extract.model.{layer_norm,post_extract_proj}.*
    feature_extract.model.encoder.pos_conv.0.{weight_g,weight_v,bias}    weight-normed conv positions
    feature_extract.model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*, .grep_linear.*, .grep_a
    feature_extract.model.encoder.layers.0.self_attn.relative_attention_bias.weight   (buckets, H)
    feature_extract.model.encoder.layers.{i}.{self_attn_layer_norm,fc1,fc2,final_layer_norm}.*
    feature_extract.model.encoder.layer_norm.*
    feature_weight, layer1..layer4, conv, pooling, bn, linear             the ECAPA head

``feature_extract`` is s3prl's WavLM wrapper and ``model`` the UniSpeech WavLM inside it. The wrapper
layer-normalises the wave (WavLM-Large's ``normalize=True``) and collects as hidden states the input of
every transformer layer plus the encoder output after its final layer norm (L + 1 tensors). The head
mixes them with ``softmax(feature_weight)``, adds 1e-6, instance-normalises each channel over time and
runs the ECAPA-TDNN (SE-Res2 blocks, attentive statistics pooling) to a 256-d embedding. SIM is the
cosine of two embeddings, each clip resampled to 16 kHz with ``torchaudio.transforms.Resample`` and
embedded alone at full length, as upstream's ``verification.py`` does.

Only the WavLM-Large recipe is built (layer-norm conv extractor, pre-norm transformer, gated relative
position bias). Sizes are read from the checkpoint's tensor shapes, so the same path loads the real
file and a tiny random one; two numbers no tensor carries are constants of WavLM: the bias table's
``MAX_DISTANCE`` (800) and each conv kernel's stride (``CONV_STRIDES``).

Shapes: B batch, N wave samples (16 kHz), T frames (20 ms), D WavLM width, H heads, L hidden states,
C ECAPA channels, E embedding dim.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2train.judges import JUDGE_RATE

log = logging.getLogger(__name__)

MAX_DISTANCE = 800  # WavLM's relative-position range; the checkpoint holds only the bucket table
CONV_STRIDES = {10: 5, 3: 2, 2: 2}  # conv kernel -> stride in the WavLM feature extractor
WAVLM_PREFIX = "feature_extract.model."

LARGE_CONV = ((512, 10),) + ((512, 3),) * 4 + ((512, 2),) * 2


@dataclass(frozen=True)
class SimArch:
    """Sizes of the SIM model; defaults are WavLM-Large + ECAPA_TDNN_SMALL (what the checkpoint holds)."""

    conv_layers: tuple[tuple[int, int], ...] = LARGE_CONV  # (channels, kernel) per conv block
    dim: int = 1024
    ffn_dim: int = 4096
    layers: int = 24
    heads: int = 16
    num_buckets: int = 320
    conv_pos: int = 128  # kernel of the convolutional position embedding
    conv_pos_groups: int = 16
    channels: int = 512  # ECAPA block width
    cat_channels: int = 1536  # after the 1x1 conv over the three concatenated blocks
    attention_channels: int = 128
    se_bottleneck: int = 128
    res2_scale: int = 8
    emb_dim: int = 256

    def __post_init__(self):
        object.__setattr__(self, "conv_layers", tuple(tuple(c) for c in self.conv_layers))
        bad = [k for _, k in self.conv_layers if k not in CONV_STRIDES]
        if bad:
            raise ValueError(f"WavLM conv kernels must be among {sorted(CONV_STRIDES)}; got {bad}")
        if self.dim % self.heads or self.dim % self.conv_pos_groups:
            raise ValueError(f"dim={self.dim} must divide by heads={self.heads} and conv_pos_groups")
        if self.channels % self.res2_scale:
            raise ValueError(f"ECAPA channels={self.channels} must divide by res2_scale={self.res2_scale}")
        if self.num_buckets < 4:
            raise ValueError("num_buckets must be at least 4 (half per direction, half of that exact)")


TINY_ARCH = dict(
    conv_layers=((16, 10), (16, 3), (16, 2)),
    dim=32,
    ffn_dim=64,
    layers=2,
    heads=4,
    num_buckets=32,
    conv_pos=8,
    conv_pos_groups=4,
    channels=32,
    cat_channels=48,
    attention_channels=8,
    se_bottleneck=8,
    res2_scale=4,
    emb_dim=16,
)


# ---------------------------------------------------------------------------------------------- WavLM


class _SwapLastTwo(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(-2, -1)


def _conv_block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    # Indices follow the checkpoint: 0 conv, 1 dropout slot, 2 (transpose, layer norm, transpose), 3 GELU.
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, stride=CONV_STRIDES[kernel], bias=False),
        nn.Identity(),
        nn.Sequential(_SwapLastTwo(), nn.LayerNorm(c_out), _SwapLastTwo()),
        nn.GELU(),
    )


class ConvFeatureExtractor(nn.Module):
    def __init__(self, conv_layers: tuple[tuple[int, int], ...]):
        super().__init__()
        ins = [1] + [c for c, _ in conv_layers[:-1]]
        self.conv_layers = nn.ModuleList(
            _conv_block(c_in, c, k) for c_in, (c, k) in zip(ins, conv_layers, strict=True)
        )

    def forward(self, wave_BN: Tensor) -> Tensor:
        x = wave_BN.unsqueeze(1)
        for block in self.conv_layers:
            x = block(x)
        return x  # (B, C_conv, T)


class WeightNormConv1d(nn.Module):
    """Grouped conv with ``weight = v * g / ||v||`` (norm over all but the kernel axis, as
    ``weight_norm(dim=2)``); output trimmed to the input length (same padding for even kernels)."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel) * (4 / (kernel * dim)) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x_BDT: Tensor) -> Tensor:
        v = self.weight_v
        weight = v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))
        y = F.conv1d(x_BDT, weight, self.bias, padding=v.shape[-1] // 2, groups=self.groups)
        return y[..., : x_BDT.shape[-1]]


def relative_buckets(length: int, num_buckets: int, max_distance: int = MAX_DISTANCE) -> Tensor:
    """(T, T) bucket of ``key - query``: half the buckets per direction, exact below a quarter of
    ``num_buckets``, logarithmic up to ``max_distance``, the last bucket beyond."""
    pos = torch.arange(length)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


class GatedRelPosAttention(nn.Module):
    """Self-attention whose logits get the relative position bias scaled by a per-query, per-head gate
    computed from the (normed) layer input: ``gate = a * (b * grep_a - 1) + 2`` with a, b sigmoids."""

    def __init__(self, dim: int, heads: int, num_buckets: int, has_bias_table: bool):
        super().__init__()
        self.heads = heads
        self.num_buckets = num_buckets
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.grep_linear = nn.Linear(dim // heads, 8)
        self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def position_bias(self, length: int) -> Tensor:
        buckets = relative_buckets(length, self.num_buckets).to(self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # (H, T, T)

    def forward(self, x_BTD: Tensor, bias_HTT: Tensor) -> Tensor:
        B, T, D = x_BTD.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, D/H)

        gate_a, gate_b = torch.sigmoid(
            self.grep_linear(heads(x_BTD)).view(B, self.heads, T, 2, 4).sum(-1)
        ).chunk(2, dim=-1)
        gate_BHT1 = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
        q, k, v = heads(self.q_proj(x_BTD)), heads(self.k_proj(x_BTD)), heads(self.v_proj(x_BTD))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=gate_BHT1 * bias_HTT)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer (WavLM-Large's ``layer_norm_first``), exact-erf GELU."""

    def __init__(self, arch: SimArch, has_bias_table: bool):
        super().__init__()
        self.self_attn = GatedRelPosAttention(arch.dim, arch.heads, arch.num_buckets, has_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(arch.dim)
        self.fc1 = nn.Linear(arch.dim, arch.ffn_dim)
        self.fc2 = nn.Linear(arch.ffn_dim, arch.dim)
        self.final_layer_norm = nn.LayerNorm(arch.dim)

    def forward(self, x_BTD: Tensor, bias_HTT: Tensor) -> Tensor:
        x_BTD = x_BTD + self.self_attn(self.self_attn_layer_norm(x_BTD), bias_HTT)
        return x_BTD + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x_BTD))))


class TransformerEncoder(nn.Module):
    def __init__(self, arch: SimArch):
        super().__init__()
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(arch.dim, arch.conv_pos, arch.conv_pos_groups), nn.GELU()
        )
        self.layers = nn.ModuleList(EncoderLayer(arch, has_bias_table=i == 0) for i in range(arch.layers))
        self.layer_norm = nn.LayerNorm(arch.dim)

    def forward(self, x_BTD: Tensor) -> list[Tensor]:
        """The input of every layer, then the last layer's output after the final norm: L + 1 tensors."""
        x_BTD = x_BTD + self.pos_conv(x_BTD.transpose(1, 2)).transpose(1, 2)
        bias_HTT = self.layers[0].self_attn.position_bias(x_BTD.shape[1])  # layer 0's table serves all
        hidden = []
        for layer in self.layers:
            hidden.append(x_BTD)
            x_BTD = layer(x_BTD, bias_HTT)
        return hidden + [self.layer_norm(x_BTD)]


class WavLM(nn.Module):
    def __init__(self, arch: SimArch):
        super().__init__()
        conv_dim = arch.conv_layers[-1][0]
        self.feature_extractor = ConvFeatureExtractor(arch.conv_layers)
        self.layer_norm = nn.LayerNorm(conv_dim)
        self.post_extract_proj = nn.Linear(conv_dim, arch.dim) if conv_dim != arch.dim else nn.Identity()
        self.encoder = TransformerEncoder(arch)

    def forward(self, wave_BN: Tensor) -> list[Tensor]:
        feats_BTC = self.feature_extractor(wave_BN).transpose(1, 2)
        return self.encoder(self.post_extract_proj(self.layer_norm(feats_BTC)))


class S3prlWavLM(nn.Module):
    """What s3prl's ``wavlm_large`` expert does around the model: normalise each wave to zero mean and
    unit variance, return every hidden state."""

    def __init__(self, arch: SimArch):
        super().__init__()
        self.model = WavLM(arch)

    def forward(self, wave_BN: Tensor) -> list[Tensor]:
        return self.model(F.layer_norm(wave_BN, wave_BN.shape[-1:]))


# ---------------------------------------------------------------------------------------- ECAPA head


class Conv1dReluBn(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=padding)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2Conv1dReluBn(nn.Module):
    """Split the channels into ``scale`` groups; each but the last is convolved after adding the
    previous group's output (conv -> ReLU -> BN); the last passes through."""

    def __init__(self, channels: int, dilation: int, scale: int):
        super().__init__()
        self.width = channels // scale
        self.convs = nn.ModuleList(
            nn.Conv1d(self.width, self.width, 3, padding=dilation, dilation=dilation)
            for _ in range(scale - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(scale - 1))

    def forward(self, x_BCT: Tensor) -> Tensor:
        parts = torch.split(x_BCT, self.width, dim=1)
        out, sp = [], None
        for part, conv, bn in zip(parts, self.convs, self.bns):
            sp = part if sp is None else sp + part
            sp = bn(F.relu(conv(sp)))
            out.append(sp)
        return torch.cat(out + [parts[-1]], dim=1)


class SEConnect(nn.Module):
    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x_BCT: Tensor) -> Tensor:
        scale_BC = torch.sigmoid(self.linear2(F.relu(self.linear1(x_BCT.mean(dim=2)))))
        return x_BCT * scale_BC.unsqueeze(2)


class SERes2Block(nn.Module):
    def __init__(self, channels: int, dilation: int, scale: int, se_bottleneck: int):
        super().__init__()
        # Attribute names are the checkpoint's.
        self.Conv1dReluBn1 = Conv1dReluBn(channels, channels)
        self.Res2Conv1dReluBn = Res2Conv1dReluBn(channels, dilation, scale)
        self.Conv1dReluBn2 = Conv1dReluBn(channels, channels)
        self.SE_Connect = SEConnect(channels, se_bottleneck)

    def forward(self, x_BCT: Tensor) -> Tensor:
        y = self.Conv1dReluBn2(self.Res2Conv1dReluBn(self.Conv1dReluBn1(x_BCT)))
        return x_BCT + self.SE_Connect(y)


class AttentiveStatsPool(nn.Module):
    """Per-channel attention over time -> weighted mean and standard deviation: (B, C, T) -> (B, 2C)."""

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.linear1 = nn.Conv1d(channels, attention_channels, 1)
        self.linear2 = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x_BCT: Tensor) -> Tensor:
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(x_BCT))), dim=2)
        mean = (alpha * x_BCT).sum(dim=2)
        var = (alpha * x_BCT**2).sum(dim=2) - mean**2
        return torch.cat([mean, var.clamp(min=1e-9).sqrt()], dim=1)


class WavLMEcapa(nn.Module):
    """16 kHz waves (B, N) -> speaker embeddings (B, E)."""

    def __init__(self, arch: SimArch):
        super().__init__()
        c = arch.channels
        self.feature_extract = S3prlWavLM(arch)
        self.feature_weight = nn.Parameter(torch.zeros(arch.layers + 1))
        self.instance_norm = nn.InstanceNorm1d(arch.dim)
        self.layer1 = Conv1dReluBn(arch.dim, c, kernel=5, padding=2)
        self.layer2 = SERes2Block(c, 2, arch.res2_scale, arch.se_bottleneck)
        self.layer3 = SERes2Block(c, 3, arch.res2_scale, arch.se_bottleneck)
        self.layer4 = SERes2Block(c, 4, arch.res2_scale, arch.se_bottleneck)
        self.conv = nn.Conv1d(3 * c, arch.cat_channels, 1)
        self.pooling = AttentiveStatsPool(arch.cat_channels, arch.attention_channels)
        self.bn = nn.BatchNorm1d(2 * arch.cat_channels)
        self.linear = nn.Linear(2 * arch.cat_channels, arch.emb_dim)

    def features(self, wave_BN: Tensor) -> Tensor:
        hidden_LBTD = torch.stack(self.feature_extract(wave_BN))
        weights_L = F.softmax(self.feature_weight, dim=-1)
        x_BTD = (weights_L[:, None, None, None] * hidden_LBTD).sum(dim=0)
        return self.instance_norm(x_BTD.transpose(1, 2) + 1e-6)  # (B, D, T)

    def forward(self, wave_BN: Tensor) -> Tensor:
        out1 = self.layer1(self.features(wave_BN))
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        x_BCT = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.linear(self.bn(self.pooling(x_BCT)))


def build_sim_model(**arch) -> WavLMEcapa:
    """The full SIM module under the official parameter names; ``build_sim_model(**TINY_ARCH)`` for tests."""
    return WavLMEcapa(SimArch(**arch))


# ------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(model_state: dict, path: str | Path) -> None:
    """Write ``{'model': state_dict}``, the layout of ``wavlm_large_finetune.pth``."""
    torch.save({"model": dict(model_state)}, Path(path))


def _load_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(
            f"SIM checkpoint {str(path)!r} does not exist; pass the local path of Seed-TTS-Eval's "
            "wavlm_large_finetune.pth"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"torch.load(weights_only=True) refused {str(path)!r}: it pickles Python objects besides "
            f"tensors ({str(err).splitlines()[0]}). If you trust the file, keep only its weights once: "
            "save_checkpoint(torch.load(path, weights_only=False)['model'], new_path)"
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{str(path)!r} is not the official layout {{'model': state_dict}}")
    return ckpt["model"]


def _shape(state: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        if key.startswith(WAVLM_PREFIX):
            raise ValueError(
                f"the checkpoint holds no WavLM weights ({key} is absent). Upstream fills them from "
                "s3prl's WavLM-Large download, which this judge does not do; use a checkpoint with the "
                "feature_extract.model.* entries (the official wavlm_large_finetune.pth has them)"
            )
        raise ValueError(f"the checkpoint has no ECAPA head entry {key}; is it wavlm_large_finetune.pth?")
    return tuple(state[key].shape)


def infer_arch(state: dict[str, Tensor]) -> dict:
    """The ``SimArch`` fields, read from the tensor shapes of an official-layout state dict."""
    w = WAVLM_PREFIX
    conv = []
    while f"{w}feature_extractor.conv_layers.{len(conv)}.0.weight" in state or not conv:
        c_out, _, kernel = _shape(state, f"{w}feature_extractor.conv_layers.{len(conv)}.0.weight")
        conv.append((c_out, kernel))
    layers = 0
    while f"{w}encoder.layers.{layers}.fc1.weight" in state:
        layers += 1
    ffn_dim, dim = _shape(state, f"{w}encoder.layers.0.fc1.weight")
    num_buckets, heads = _shape(state, f"{w}encoder.layers.0.self_attn.relative_attention_bias.weight")
    _, group_width, conv_pos = _shape(state, f"{w}encoder.pos_conv.0.weight_v")
    channels = _shape(state, "layer1.conv.weight")[0]
    return dict(
        conv_layers=tuple(conv),
        dim=dim,
        ffn_dim=ffn_dim,
        layers=layers,
        heads=heads,
        num_buckets=num_buckets,
        conv_pos=conv_pos,
        conv_pos_groups=dim // group_width,
        channels=channels,
        cat_channels=_shape(state, "conv.weight")[0],
        attention_channels=_shape(state, "pooling.linear1.weight")[0],
        se_bottleneck=_shape(state, "layer2.SE_Connect.linear1.weight")[0],
        res2_scale=channels // _shape(state, "layer2.Res2Conv1dReluBn.convs.0.weight")[0],
        emb_dim=_shape(state, "linear.weight")[0],
    )


# ------------------------------------------------------------------------------------------- judge


def load_audio_like_upstream(path: str | Path) -> tuple[np.ndarray, int]:
    """``librosa.load(sr=None, mono=False)`` at the file's own rate; a multi-channel file keeps its first
    channel (upstream's ``wav2[0, :]``). Upstream's branch for the first file of a pair indexes
    ``wav1[:, 0]`` instead, one sample per channel, so a stereo prompt fails there and its pair is
    skipped; mono files, the usual case, load identically."""
    import librosa

    wav, sr = librosa.load(str(path), sr=None, mono=False)
    return (wav[0] if wav.ndim == 2 else wav), int(sr)


class WavLMEcapaSim:
    """Seed-TTS-Eval SIM: ``similarity(wav_a, sr_a, wav_b, sr_b)`` is the cosine of the two embeddings.

    Loads like upstream's ``load_state_dict(state['model'], strict=False)``: entries the model does not
    use are ignored and listed in ``unexpected_keys``. A missing entry is refused instead (upstream
    would keep s3prl's downloaded WavLM weights or a random head there), except BatchNorm's
    ``num_batches_tracked``, which inference never reads.
    """

    name = "wavlm-large-ecapa"

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        state = _load_state(Path(checkpoint))
        self.arch = SimArch(**infer_arch(state))
        self.model = WavLMEcapa(self.arch)
        try:
            result = self.model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a tensor whose shape disagrees with the others
            raise ValueError(f"inconsistent SIM checkpoint {str(checkpoint)!r}: {err}") from err
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing:
            _shape(state, missing[0])  # raises the WavLM or head sentence
        self.unexpected_keys = list(result.unexpected_keys)
        if self.unexpected_keys:
            log.warning(
                "SIM checkpoint: ignored %d entries the model does not use (as upstream's strict=False): %s",
                len(self.unexpected_keys),
                ", ".join(self.unexpected_keys[:8]) + (" ..." if len(self.unexpected_keys) > 8 else ""),
            )
        self.model.to(device).eval()
        self.device = device
        self._resamplers: dict[int, torch.nn.Module] = {}

    def _to_16k(self, wave: Tensor, sample_rate: int) -> Tensor:
        import torchaudio

        if sample_rate not in self._resamplers:
            self._resamplers[sample_rate] = torchaudio.transforms.Resample(sample_rate, JUDGE_RATE)
        return self._resamplers[sample_rate](wave)

    @torch.inference_mode()
    def embed(self, wav: np.ndarray, sample_rate: int) -> Tensor:
        """1-D mono wave at any rate -> (E,) float32 embedding on the CPU."""
        wav = np.asarray(wav)
        if wav.ndim != 1:
            raise ValueError(f"embed takes a 1-D mono wave; got shape {wav.shape}")
        wave_1N = self._to_16k(torch.from_numpy(wav).float().unsqueeze(0), int(sample_rate))
        frames = wave_1N.shape[-1]
        for _, kernel in self.arch.conv_layers:
            frames = (frames - kernel) // CONV_STRIDES[kernel] + 1
        if frames < 1:
            raise ValueError(f"a clip of {len(wav)} samples at {sample_rate} Hz is too short for WavLM")
        return self.model(wave_1N.to(self.device))[0].float().cpu()

    def similarity(self, wav_a: np.ndarray, sr_a: int, wav_b: np.ndarray, sr_b: int) -> float:
        emb_a, emb_b = self.embed(wav_a, sr_a), self.embed(wav_b, sr_b)
        return F.cosine_similarity(emb_a[None], emb_b[None]).item()
