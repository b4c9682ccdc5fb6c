"""Load the released Fish Audio S2 Pro codec (``codec.pth`` + its Hydra ``config.json``) into our ``Codec``.

The release is upstream fish-speech's ``modded_dac.DAC`` with ``rvq.DownsampleResidualVectorQuantize``.
Our modules compute the same function (``s2train.models.codec`` documents the quirks); only the key
names differ, and ``official_to_ours`` maps them:

=====================================================  =====================================================
official key (``codec.pth``)                           ours
=====================================================  =====================================================
``encoder.block.0.*``                                  ``encoder.conv_in.*``
``encoder.block.{i}.block.{0,1,2}.*`` (i = 1..n)       ``encoder.blocks.{i-1}.res_units.{0,1,2}.*``
``encoder.block.{i}.block.{3,4,5}.*``                  ``encoder.blocks.{i-1}.{act,down,transformer}.*``
``encoder.block.{n+1}.*``, ``encoder.block.{n+2}.*``   ``encoder.act_out.*``, ``encoder.conv_out.*``
``decoder.model.0.*``                                  ``decoder.conv_in.*``
``decoder.model.{i}.block.{0,1}.*`` (i = 1..n)         ``decoder.blocks.{i-1}.{act,up}.*``
``decoder.model.{i}.block.{2,3,4}.*``                  ``decoder.blocks.{i-1}.res_units.{0,1,2}.*``
``decoder.model.{n+1}.*``, ``decoder.model.{n+2}.*``   ``decoder.act_out.*``, ``decoder.conv_out.*``
``….res_units.{j}.block.{0,1,2,3}.*``                  ``….res_units.{j}.{act1,conv1,act2,conv2}.*``
``quantizer.semantic_quantizer.quantizers.0.*``        ``quantizer.semantic.*``
``quantizer.quantizer.quantizers.{i}.*``               ``quantizer.residual.{i}.*``
``….{in,out}_proj.weight_g`` / ``.weight_v``           ``….{in,out}_proj.parametrizations.weight.original0/1``
``quantizer.{down,up}sample.{i}.{0,1}.*``              ``quantizer.{down,up}sample.{i}.{conv,convnext}.*``
``quantizer.{pre,post}_module.*``                      ``quantizer.{pre,post}_transformer.*``
=====================================================  =====================================================

Transformer internals (``layers.L.attention.wqkv``, ``…_layer_scale.gamma``, ``norm``), ConvNeXt
internals and conv weight-norm parametrizations keep their official names. The released config's
``decoder_transformer_layers`` builds a transformer upstream never calls, so it has no weights and no
counterpart here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from s2train.models.codec import Codec, CodecConfig, s2pro

STALE_SUFFIXES = ("causal_mask", "freqs_cis")  # non-persistent buffers that older saves still hold


def codec_config_from_fish(cfg: dict[str, Any]) -> CodecConfig:
    """Our ``CodecConfig`` from upstream's resolved ``modded_dac_vq`` config (the codec's config.json)."""

    def need(section: dict[str, Any], key: str, where: str) -> Any:
        if key not in section:
            raise ValueError(f"the codec config has no {where}{key}; is this a modded_dac_vq config?")
        return section[key]

    quantizer = need(cfg, "quantizer", "")
    pre = need(quantizer, "pre_module", "quantizer.")
    post = need(quantizer, "post_module", "quantizer.")
    general = cfg.get("transformer_general_config", {})
    if pre != post:
        raise ValueError("the codec config's pre_module and post_module differ; s2train builds both alike")
    transformer = need(pre, "config", "quantizer.pre_module.")
    if not pre.get("causal", False):
        raise ValueError("the codec config has a non-causal pre/post module; s2train's codec is causal only")
    encoder_dim, encoder_rates = need(cfg, "encoder_dim", ""), list(need(cfg, "encoder_rates", ""))
    latent_dim = encoder_dim * 2 ** len(encoder_rates)
    dims = {
        "quantizer.input_dim": quantizer.get("input_dim", latent_dim),
        "pre_module.input_dim": pre.get("input_dim", latent_dim),
        "pre_module.config.dim": need(transformer, "dim", "quantizer.pre_module.config."),
    }
    if any(dim != latent_dim for dim in dims.values()):
        raise ValueError(
            f"the codec config's quantizer widths {dims} must all equal encoder_dim * 2**n = {latent_dim}"
        )
    n_heads = need(transformer, "n_head", "quantizer.pre_module.config.")
    if transformer.get("n_local_heads", -1) not in (-1, n_heads):
        raise ValueError("the codec transformers have grouped key/value heads, which s2train does not build")
    if general.get("head_dim", 64) != 64:
        raise ValueError(
            "the codec encoder transformer head_dim must be 64 (upstream fixes n_head = dim // 64)"
        )
    for key, default in (("rope_base", 10000.0), ("norm_eps", 1e-5)):
        if float(general.get(key, default)) != float(transformer.get(key, default)):
            raise ValueError(f"the codec config's encoder and quantizer transformers differ in {key}")
    return CodecConfig(
        sample_rate=need(cfg, "sample_rate", ""),
        encoder_dim=encoder_dim,
        encoder_rates=encoder_rates,
        encoder_transformer_layers=list(need(cfg, "encoder_transformer_layers", "")),
        decoder_dim=need(cfg, "decoder_dim", ""),
        decoder_rates=list(need(cfg, "decoder_rates", "")),
        downsample_factors=list(need(quantizer, "downsample_factor", "quantizer.")),
        semantic_codebook_size=need(quantizer, "semantic_codebook_size", "quantizer."),
        n_residual_codebooks=need(quantizer, "n_codebooks", "quantizer."),
        codebook_size=need(quantizer, "codebook_size", "quantizer."),
        codebook_dim=need(quantizer, "codebook_dim", "quantizer."),
        quantizer_dropout=float(quantizer.get("quantizer_dropout", 0.0)),
        transformer_layers=need(transformer, "n_layer", "quantizer.pre_module.config."),
        transformer_heads=n_heads,
        transformer_head_dim=need(transformer, "head_dim", "quantizer.pre_module.config."),
        transformer_intermediate=need(transformer, "intermediate_size", "quantizer.pre_module.config."),
        transformer_window=need(pre, "window_size", "quantizer.pre_module."),
        encoder_transformer_head_dim=64,
        encoder_transformer_window=512,  # upstream's getattr fallback: the partial config has no window
        rope_base=float(transformer.get("rope_base", 10000.0)),
        norm_eps=float(transformer.get("norm_eps", 1e-5)),
    )


def official_to_ours(key: str, config: CodecConfig) -> str:
    """One official ``codec.pth`` key -> the matching key of our ``Codec.state_dict()`` (table above)."""
    n_enc, n_dec = len(config.encoder_rates), len(config.decoder_rates)

    def block(prefix: str, slots: tuple[str, ...]) -> Callable[[re.Match[str]], str]:
        return lambda m: f"{prefix}.blocks.{int(m[1]) - 1}.{slots[int(m[2])]}."

    rules: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
        (r"^encoder\.block\.0\.", "encoder.conv_in."),
        (rf"^encoder\.block\.{n_enc + 1}\.", "encoder.act_out."),
        (rf"^encoder\.block\.{n_enc + 2}\.", "encoder.conv_out."),
        (
            r"^encoder\.block\.(\d+)\.block\.(\d)\.",
            block("encoder", ("res_units.0", "res_units.1", "res_units.2", "act", "down", "transformer")),
        ),
        (r"^decoder\.model\.0\.", "decoder.conv_in."),
        (rf"^decoder\.model\.{n_dec + 1}\.", "decoder.act_out."),
        (rf"^decoder\.model\.{n_dec + 2}\.", "decoder.conv_out."),
        (
            r"^decoder\.model\.(\d+)\.block\.(\d)\.",
            block("decoder", ("act", "up", "res_units.0", "res_units.1", "res_units.2")),
        ),
        (r"\.res_units\.(\d)\.block\.0\.", r".res_units.\1.act1."),
        (r"\.res_units\.(\d)\.block\.1\.", r".res_units.\1.conv1."),
        (r"\.res_units\.(\d)\.block\.2\.", r".res_units.\1.act2."),
        (r"\.res_units\.(\d)\.block\.3\.", r".res_units.\1.conv2."),
        (r"^quantizer\.semantic_quantizer\.quantizers\.0\.", "quantizer.semantic."),
        (r"^quantizer\.quantizer\.quantizers\.", "quantizer.residual."),
        (r"\.weight_g$", ".parametrizations.weight.original0"),
        (r"\.weight_v$", ".parametrizations.weight.original1"),
        (r"^quantizer\.(down|up)sample\.(\d+)\.0\.", r"quantizer.\1sample.\2.conv."),
        (r"^quantizer\.(down|up)sample\.(\d+)\.1\.", r"quantizer.\1sample.\2.convnext."),
        (r"^quantizer\.pre_module\.", "quantizer.pre_transformer."),
        (r"^quantizer\.post_module\.", "quantizer.post_transformer."),
    ]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def read_codec_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The codec weights of a ``codec.pth``: unwraps ``state_dict``, keeps and strips ``generator.`` keys
    when a training checkpoint has them, and drops stale ``*causal_mask`` / ``*freqs_cis`` buffers."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    if any(key.startswith("generator.") for key in state):
        state = {
            key.removeprefix("generator."): v for key, v in state.items() if key.startswith("generator.")
        }
    return {key: v for key, v in state.items() if not key.endswith(STALE_SUFFIXES)}


def load_fish_codec(folder_or_pth: str | Path, config_json: str | Path | None = None) -> Codec:
    """A ``Codec`` in eval mode with the released weights of ``codec.pth`` (a file, or a folder holding it).

    The config is ``config_json`` when given, else the ``config.json`` beside the weights when it describes
    a codec. The released S2 Pro folder's ``config.json`` describes the Dual-AR model instead; then the
    ``s2pro`` preset is used, and strict loading checks every key and shape against it.
    """
    path = Path(folder_or_pth)
    pth = path / "codec.pth" if path.is_dir() else path
    if not pth.is_file():
        raise ValueError(f"no codec weights at {pth}")
    if config_json is not None:
        config = codec_config_from_fish(json.loads(Path(config_json).read_text(encoding="utf-8")))
    else:
        beside = pth.parent / "config.json"
        found = json.loads(beside.read_text(encoding="utf-8")) if beside.is_file() else {}
        config = codec_config_from_fish(found) if "quantizer" in found else s2pro()
    codec = Codec(config)
    state = {official_to_ours(key, config): value for key, value in read_codec_state_dict(pth).items()}
    missing, unexpected = codec.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{pth} does not match the codec its config describes: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    return codec.eval()
