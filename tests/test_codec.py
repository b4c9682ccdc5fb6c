"""The RVQ codec (``s2train.models.codec``) and the released-format loader (``s2train.compat.fish_codec``).

Property tests run on the ``tiny`` preset; ``s2pro`` is built once for its shape and parameter count.
Parity tests load the tiny upstream checkpoint from tests/fixtures/fish_s2 and compare against tensors that
upstream fish-speech produced (README section 3 of the fixture folder).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from s2train.compat.fish_codec import load_fish_codec, read_codec_state_dict
from s2train.models.codec import Codec, CodecConfig, s2pro, tiny

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fish_s2"  # released S2 Pro formats, tiny weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small; one thread avoids contention with other work on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny(**changes) -> Codec:
    torch.manual_seed(0)
    return Codec(dataclasses.replace(tiny(), **changes))


def sines(batch: int, samples: int, sample_rate: int) -> torch.Tensor:
    """(B, 1, T) sums of two sines with a different pitch per item."""
    t = torch.arange(samples) / sample_rate
    f0 = 150.0 + 70.0 * torch.arange(batch)[:, None]
    return (0.3 * torch.sin(2 * math.pi * f0 * t) + 0.1 * torch.sin(2 * math.pi * 3.1 * f0 * t))[:, None]


def random_codes(cfg: CodecConfig, batch: int, frames: int) -> torch.Tensor:
    """(B, K, T) valid codes."""
    semantic = torch.randint(cfg.semantic_codebook_size, (batch, 1, frames))
    residual = torch.randint(cfg.codebook_size, (batch, cfg.n_residual_codebooks, frames))
    return torch.cat([semantic, residual], dim=1)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "change, words",
    [
        ({"decoder_rates": [8, 5, 2]}, "same product"),
        ({"codebook_size": 2**16 + 1}, "uint16"),
        ({"encoder_transformer_layers": [0, 1]}, "one entry per encoder rate"),
        ({"quantizer_dropout": 1.5}, "between 0 and 1"),
        ({"decoder_dim": 60}, "divisible"),
        ({"encoder_type": "wav2vec"}, "conv or mel"),
        ({"encoder_residual_units": 4}, "0 to 3"),
    ],
)
def test_config_rejects_inconsistent_sizes(change, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(tiny(), **change)


# ----------------------------------------------------------------------------------- shapes, round trip


def test_tiny_round_trip_shapes_and_dtypes():
    codec = make_tiny().eval()
    cfg = codec.config
    assert codec.samples_per_frame == 640 and codec.frame_rate == 25.0
    wav = sines(2, 16000 + 100, cfg.sample_rate)  # not a whole number of frames
    codes = codec.encode(wav, cfg.sample_rate)
    frames = math.ceil(wav.shape[-1] / codec.samples_per_frame)
    assert codes.shape == (2, cfg.n_codebooks, frames) and codes.dtype == torch.int64
    assert codes[:, 0].max() < cfg.semantic_codebook_size and codes[:, 1:].max() < cfg.codebook_size
    assert codes.min() >= 0
    assert torch.equal(codec.encode(wav[0, 0], cfg.sample_rate), codes[0])  # 1-D in, (K, T) out
    assert torch.equal(codec.encode(wav[:, 0], cfg.sample_rate), codes)  # (B, T) in
    audio = codec.decode(codes)
    assert audio.shape == (2, 1, frames * codec.samples_per_frame) and audio.dtype == torch.float32
    assert audio.abs().max() <= 1.0
    assert codec.decode(codes[0]).shape == (1, 1, frames * codec.samples_per_frame)
    out = codec(wav)
    assert out["audio"].shape == wav.shape and torch.equal(out["codes"], codes)


def test_mel_encoder_round_trip_and_log_mel_front_end():
    codec = make_tiny(encoder_type="mel", encoder_mels=40)
    cfg = codec.config
    assert not any(name.startswith("encoder.blocks") for name, _ in codec.named_parameters())
    wav = sines(2, 3 * cfg.samples_per_frame - 100, cfg.sample_rate)
    codes = codec.encode(wav, cfg.sample_rate)
    assert codes.shape == (2, cfg.n_codebooks, 3)
    assert codec.decode(codes).shape == (2, 1, 3 * cfg.samples_per_frame)
    # One log-mel frame per hop, from the window that ends with that hop: a tone's energy sits in the
    # band of its pitch, and silence before the tone stays at the floor.
    hop = cfg.hop_length
    tone = torch.zeros(1, 1, 16 * hop)
    t = torch.arange(8 * hop) / cfg.sample_rate
    tone[..., 8 * hop :] = 0.5 * torch.sin(2 * math.pi * 1000.0 * t)
    mel = codec.encoder.log_mel(tone)  # (1, M, 16)
    assert mel.shape == (1, 40, 16)
    assert torch.allclose(mel[..., :8], torch.tensor(-5.0))
    band = int(mel[0, :, 12].argmax())
    centres = torch.linspace(0, cfg.sample_rate / 2, codec.encoder.n_fft // 2 + 1) @ codec.encoder.fbank.T
    centres = centres / codec.encoder.fbank.sum(-1)  # each band's mean frequency
    assert abs(float(centres[band]) - 1000.0) < 200.0


def test_mel_skip_adds_a_linear_map_of_the_log_mel():
    """encoder_mel_skip: the encoder's output is its conv path plus a 1 x 1 conv of the scaled log-mel
    frames; encoder_residual_units=0 leaves the conv path without residual units."""
    codec = make_tiny(encoder_type="mel", encoder_mels=40, encoder_residual_units=0, encoder_mel_skip=True)
    encoder = codec.encoder
    assert len(encoder.res_units) == 0 and encoder.skip is not None
    wav = sines(1, 8 * codec.config.hop_length, codec.config.sample_rate)
    with torch.no_grad():
        features = (encoder.log_mel(wav) + 2.5) / 2.5
        conv_path = encoder.conv_out(encoder.act_out(encoder.conv_in(features)))
        skip = encoder.skip(features)
        assert torch.allclose(encoder(wav), conv_path + skip, atol=1e-6)
        assert skip.abs().mean() > 0.1 * conv_path.abs().mean()
    assert make_tiny(encoder_type="mel").encoder.skip is None  # off by default


def test_encode_and_decode_reject_bad_input():
    codec = make_tiny().eval()
    with pytest.raises(ValueError, match="resample"):
        codec.encode(torch.zeros(1000), 22050)
    with pytest.raises(ValueError, match="mono"):
        codec.encode(torch.zeros(1, 2, 1000), 16000)
    with pytest.raises(ValueError, match="1 <= K <= 4"):
        codec.decode(torch.zeros(1, 5, 3, dtype=torch.long))


def test_codes_fit_uint16():
    codec = make_tiny().eval()
    codes = codec.encode(torch.randn(3, 8000) * 0.3, 16000)
    assert torch.equal(codes.to(torch.uint16).long(), codes)
    big = s2pro()
    assert max(big.semantic_codebook_size, big.codebook_size) <= torch.iinfo(torch.uint16).max + 1


def test_s2pro_shape_parameters_and_round_trip():
    cfg = s2pro()
    assert (cfg.samples_per_frame, cfg.n_codebooks, cfg.latent_dim) == (2048, 10, 1024)
    torch.manual_seed(0)
    codec = Codec(cfg).eval()
    n_params = sum(p.numel() for p in codec.parameters())
    # The same key families reproduce the tiny upstream checkpoint's 537,006 exactly (test below).
    assert n_params == 391_430_530, f"s2pro codec has {n_params:,} parameters"
    wav = sines(1, 44100, 44100)[0, 0]
    with torch.inference_mode():
        codes = codec.encode(wav, 44100)
        audio = codec.decode(codes)
    assert codes.shape == (10, 22) and codes[0].max() < 4096 and codes[1:].max() < 1024
    assert audio.shape == (1, 1, 22 * 2048) and torch.isfinite(audio).all()


# ------------------------------------------------------------------------------------------- quantizer


def test_quantizer_dropout_only_in_training():
    codec = make_tiny(quantizer_dropout=1.0)
    quantizer, k = codec.quantizer, codec.config.n_codebooks
    latent = codec.encoder(sines(8, 2560, 16000)).detach()
    with torch.no_grad():
        codec.train()
        out = quantizer(latent)
        used = out["codebooks_used"]
        assert used.min() < k and used.min() >= 2 and used.max() <= k
        for b in range(8):  # each item's decoder input is the sum of exactly its first used[b] codebooks
            expected = quantizer.decode(out["codes"][b : b + 1, : used[b]])
            torch.testing.assert_close(out["latent"][b : b + 1], expected, atol=1e-5, rtol=0)
        codec.eval()
        out = quantizer(latent)
        assert (out["codebooks_used"] == k).all()
        torch.testing.assert_close(out["latent"], quantizer.decode(out["codes"]), atol=1e-5, rtol=0)


def test_quantizer_losses_are_named_and_reach_the_encoder():
    codec = make_tiny().train()
    out = codec(sines(2, 3200, 16000))
    assert out["commitment_loss"] > 0 and out["codebook_loss"] > 0
    (out["commitment_loss"] + out["codebook_loss"]).backward()
    assert codec.encoder.conv_in.conv.parametrizations.weight.original1.grad.abs().sum() > 0
    assert codec.quantizer.residual[0].codebook.weight.grad.abs().sum() > 0


def test_quantizer_bypass_passes_the_latent_and_records_codes():
    codec = make_tiny().train()
    wav = sines(2, 6400, 16000)
    out = codec(wav, bypass_quantizer=True)
    assert out["commitment_loss"] == 0 and out["codebook_loss"] == 0
    assert out["codes"].shape == (2, codec.config.n_codebooks, 10) and out["audio"].shape == wav.shape
    assert codec.quantizer.semantic.recent.shape[0] == 20 and codec.quantizer.semantic.usage.sum() == 20
    out["audio"].square().mean().backward()
    assert codec.encoder.conv_in.conv.parametrizations.weight.original1.grad.abs().sum() > 0
    assert codec.quantizer.semantic.codebook.weight.grad is None  # no code reaches the decoder
    z = codec.quantizer.project(codec.encoder(wav))
    expected = codec.decoder(codec.quantizer.upsample_frames(codec.quantizer.post_transformer(z)))
    torch.testing.assert_close(out["audio"], expected)


def test_istft_phase_advance_makes_a_steady_latent_a_steady_tone():
    """A latent that is the same at every hop gives the same spectrum every hop. Without the advance the
    output then repeats every hop (a buzz at the hop rate's harmonics); with it, the spectrum's bins are
    steady sinusoids: bin 3 advances 1.5 periods per hop, so the output flips sign from hop to hop."""
    config = dataclasses.replace(tiny(), decoder_type="istft", istft_layers=0)
    for advance, sign in ((False, 1.0), (True, -1.0)):
        decoder = make_tiny(decoder_type="istft", istft_layers=0, istft_phase_advance=advance).decoder
        hop = decoder.hop
        with torch.no_grad():
            decoder.head.weight.zero_()
            bias = torch.full((2 * (hop + 1),), -30.0)
            bias[3] = 0.0  # bin 3: magnitude 1; phase 0 (the second half); every other bin silent
            bias[hop + 1 :] = 0.0
            decoder.head.bias.copy_(bias)
            audio = decoder(torch.randn(1, config.latent_dim, 1).expand(1, -1, 8).contiguous())[0, 0]
        steady = audio[hop : 7 * hop]
        assert steady.abs().max() > 1e-3
        torch.testing.assert_close(steady[hop:], sign * steady[:-hop], atol=1e-6, rtol=0)


def test_dead_code_restart_changes_only_unused_codes():
    codec = make_tiny().train()
    with pytest.raises(ValueError, match="training forward"):
        codec.restart_dead_codes()
    with torch.no_grad():
        codec(sines(2, 16000, 16000))  # 50 frames: some of the 64 semantic codes stay unused
    vqs = [codec.quantizer.semantic, *codec.quantizer.residual]
    used = [vq.usage > 0 for vq in vqs]
    before = [vq.codebook.weight.detach().clone() for vq in vqs]
    recent = [vq.recent.clone() for vq in vqs]
    replaced = codec.restart_dead_codes()
    assert replaced == sum(int((~u).sum()) for u in used) and (~used[0]).sum() > 0
    for vq, u, old, rows in zip(vqs, used, before, recent):
        new = vq.codebook.weight.detach()
        assert torch.equal(new[u], old[u])
        assert (new[~u] != old[~u]).any(dim=1).all()
        assert (new[~u][:, None] == rows[None]).all(dim=2).any(dim=1).all()  # each is a recent z_e row
        assert vq.usage.sum() == 0


def test_decode_clamps_codes_without_changing_them():
    codec = make_tiny().eval()
    codes = random_codes(codec.config, 1, 5)
    wild = codes.clone()
    wild[:, 1:, 2] = 60  # above the residual codebook size 32, as an LM may emit
    given = wild.clone()
    clamped = wild.clone()
    clamped[:, 1:, 2] = 31
    with torch.inference_mode():
        assert torch.equal(codec.decode(wild), codec.decode(clamped))
    assert torch.equal(wild, given)


# ------------------------------------------------------------------------------- streaming and causality


def test_streaming_decode_equals_one_shot():
    codec = make_tiny().eval()
    codes = random_codes(codec.config, 2, 17)  # longer than the post transformer's 4-frame window
    with torch.inference_mode():
        whole = codec.decode(codes)
        for sizes in ([1, 2, 5, 9], [17], [3] * 5 + [2]):
            stream = codec.stream_decoder()
            bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
            chunks = [stream.push(codes[..., a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
            assert stream.push(codes[..., :0]).shape == (2, 1, 0)
            for chunk, size in zip(chunks, sizes):
                assert chunk.shape == (2, 1, size * codec.samples_per_frame)
            torch.testing.assert_close(torch.cat(chunks, dim=-1), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [2, 4])
@pytest.mark.parametrize("phase_advance", [False, True])
def test_istft_decoder_streams_window_hops_behind_and_equals_one_shot(phase_advance, window):
    torch.manual_seed(0)
    config = dataclasses.replace(
        tiny(),
        decoder_type="istft",
        istft_dim=32,
        istft_layers=2,
        istft_phase_advance=phase_advance,
        istft_window=window,
    )
    codec = Codec(config).eval()
    assert not any(isinstance(m, nn.ConvTranspose1d) for m in codec.decoder.modules())
    codes = random_codes(config, 2, 17)
    hop, held = config.hop_length, (window - 1) * config.hop_length
    with torch.inference_mode():
        whole = codec.decode(codes)
        assert whole.shape == (2, 1, 17 * codec.samples_per_frame)
        assert whole.abs().max() > 0
        for sizes in ([1, 2, 5, 9], [17], [3] * 5 + [2], [1] * 17):
            stream = codec.stream_decoder()
            bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
            chunks = [stream.push(codes[..., a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
            assert chunks[0].shape[-1] == max(0, sizes[0] * codec.samples_per_frame - held)  # held back
            tail = stream.flush()
            assert tail.shape == (2, 1, held) and stream.flush() is None
            torch.testing.assert_close(torch.cat([*chunks, tail], dim=-1), whole, atol=1e-5, rtol=0)
    # causal but for the window's overlap: the samples of hop h depend on no latent after h + W - 1
    latent = torch.randn(1, config.latent_dim, 12, requires_grad=True)
    audio = codec.decoder(latent)
    audio[..., : 5 * hop].sum().backward()
    last = 4 + window - 1
    assert latent.grad[..., last + 1 :].abs().sum() == 0 and latent.grad[..., last].abs().sum() > 0


def first_dependency(output_at: int, grad: torch.Tensor) -> tuple[float, float]:
    """Gradient mass at and before / after an index along the last axis."""
    return grad[..., :output_at].abs().sum().item(), grad[..., output_at:].abs().sum().item()


@pytest.mark.parametrize(
    "encoder",
    [{"encoder_type": "conv"}, {"encoder_type": "mel"}, {"encoder_type": "mel", "encoder_mel_skip": True}],
    ids=["conv", "mel", "mel-skip"],
)
def test_encoder_is_causal_by_gradient(encoder):
    codec = make_tiny(**encoder)
    hop, frame = codec.config.hop_length, codec.samples_per_frame
    wav = (torch.randn(1, 1, 8 * frame) * 0.3).requires_grad_()
    latent = codec.encoder(wav)  # (1, D, 8 * frame / hop)
    latent[..., 13].sum().backward()
    past, future = first_dependency(14 * hop, wav.grad)
    assert past > 0 and future == 0
    wav.grad = None
    z = codec.quantizer.project(codec.encoder(wav))  # (1, D, 8): the VQ input
    z[..., 3].sum().backward()
    past, future = first_dependency(4 * frame, wav.grad)
    assert past > 0 and future == 0


def test_decoder_is_causal_by_gradient():
    codec = make_tiny()
    hop, frame = codec.config.hop_length, codec.samples_per_frame
    latent = torch.randn(1, codec.config.latent_dim, 12, requires_grad=True)
    sample = 5 * hop + 17
    codec.decoder(latent)[..., sample].sum().backward()
    past, future = first_dependency(sample // hop + 1, latent.grad)
    assert past > 0 and future == 0
    z = torch.randn(1, codec.config.latent_dim, 6, requires_grad=True)  # frame-rate quantised sum
    sample = 2 * frame + 5
    audio = codec.decoder(codec.quantizer.upsample_frames(codec.quantizer.post_transformer(z)))
    audio[..., sample].sum().backward()
    past, future = first_dependency(sample // frame + 1, z.grad)
    assert past > 0 and future == 0


# ------------------------------------------------------------------------------------------- training


def test_a_few_steps_lower_the_loss():
    codec = make_tiny(quantizer_dropout=0.0).train()
    wav = sines(2, 6400, 16000)
    optimizer = torch.optim.Adam(codec.parameters(), lr=3e-3)

    def log_spectrogram(x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x[:, 0], 512, 128, window=torch.hann_window(512), return_complex=True)
        return torch.log(spec.abs() + 1e-5)

    def loss_of(out: dict[str, torch.Tensor]) -> torch.Tensor:
        spectral = F.l1_loss(log_spectrogram(out["audio"]), log_spectrogram(wav))
        return F.l1_loss(out["audio"], wav) + spectral + out["commitment_loss"] + out["codebook_loss"]

    losses = []
    for _ in range(12):
        loss = loss_of(codec(wav))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses


# --------------------------------------------------------------------------------- released-format parity


@pytest.fixture(scope="module")
def fish():
    """(loaded tiny upstream codec, reference tensors)."""
    return load_fish_codec(FIXTURES / "tiny_codec"), load_file(FIXTURES / "codec_refs.safetensors")


def test_fish_codec_builds_the_released_layout(fish):
    codec, _ = fish
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert sum(p.numel() for p in codec.parameters()) == manifest["codec"]["n_params"]
    assert len(read_codec_state_dict(FIXTURES / "tiny_codec" / "codec.pth")) == len(codec.state_dict()) == 382
    assert not codec.training and codec.samples_per_frame == manifest["codec"]["frame_length"]


def test_fish_codec_encode_matches_upstream(fish):
    codec, ref = fish
    with torch.inference_mode():
        wav = ref["waveform_in"]  # (1, 1, 44100)
        codes = codec.encode(wav, 44100)
        assert torch.equal(codes, ref["codes"])
        assert codes.shape[-1] == ref["feature_lengths"].item()
        padded = F.pad(wav, (0, -wav.shape[-1] % codec.samples_per_frame))
        latent = codec.encoder(padded)
        torch.testing.assert_close(latent, ref["encoder_out"], atol=2e-5, rtol=0)
        z = latent
        for stage in codec.quantizer.downsample:
            z = stage(z)
        torch.testing.assert_close(z, ref["quantizer_downsampled"], atol=2e-5, rtol=0)
        z = codec.quantizer.pre_transformer(z)
        torch.testing.assert_close(z, ref["quantizer_pre_module_out"], atol=2e-5, rtol=0)


def test_fish_codec_decode_matches_upstream(fish):
    codec, ref = fish
    with torch.inference_mode():
        torch.testing.assert_close(codec.quantizer.decode(ref["codes"]), ref["decoder_in"], atol=2e-5, rtol=0)
        torch.testing.assert_close(codec.decode(ref["codes"]), ref["waveform_out"], atol=1e-4, rtol=0)
        generated = ref["llm_generated_codes"].clone()
        assert generated[:, 1:].max() > 31  # the clamp is exercised
        audio = codec.decode(generated)
        torch.testing.assert_close(audio, ref["llm_generated_waveform"], atol=1e-4, rtol=0)
        assert torch.equal(generated, ref["llm_generated_codes"])
        stream = codec.stream_decoder()
        chunks = [stream.push(generated[..., a : a + 4]) for a in range(0, generated.shape[-1], 4)]
        torch.testing.assert_close(
            torch.cat(chunks, dim=-1), ref["llm_generated_waveform"], atol=1e-4, rtol=0
        )


def test_fish_codec_loader_accepts_wrapped_prefixed_and_stale_keys(fish, tmp_path):
    codec, _ = fish
    flat = torch.load(FIXTURES / "tiny_codec" / "codec.pth", map_location="cpu", weights_only=True)
    wrapped = {f"generator.{key}": value for key, value in flat.items()}
    wrapped["generator.quantizer.pre_module.causal_mask"] = torch.ones(4, 4, dtype=torch.bool)
    wrapped["generator.quantizer.post_module.freqs_cis"] = torch.zeros(4, 8, 2)
    wrapped["discriminator.conv.weight"] = torch.zeros(3)
    torch.save({"state_dict": wrapped}, tmp_path / "codec.pth")
    (tmp_path / "config.json").write_text((FIXTURES / "tiny_codec" / "config.json").read_text())
    loaded = load_fish_codec(tmp_path / "codec.pth")
    ours = codec.state_dict()
    assert all(torch.equal(value, ours[key]) for key, value in loaded.state_dict().items())


def test_fish_codec_loader_rejects_a_mismatching_config(fish, tmp_path):
    cfg = json.loads((FIXTURES / "tiny_codec" / "config.json").read_text())
    cfg["quantizer"]["n_codebooks"] = 8
    (tmp_path / "other.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        load_fish_codec(FIXTURES / "tiny_codec", config_json=tmp_path / "other.json")
