"""Load a released Fish Audio S2 Pro Dual-AR folder (``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``, and the tokenizer files) into our ``DualAR``.

The release is upstream fish-speech's ``DualARTransformer`` saved with Hugging Face style key names.
Our modules compute the same function (``s2train.models.dual_ar`` documents the quirks); the keys map
with a rename, ``official_to_ours``, that mirrors upstream's own remap with ``slow.`` / ``fast.``
where upstream strips a prefix or writes ``fast_``:

=============================================  ==========================================================
official key (safetensors)                     ours (``DualAR.state_dict()``)
=============================================  ==========================================================
``text_model.model.embeddings.weight``         ``slow.embeddings.weight`` (also the tied LM head)
``text_model.model.layers.N.*``                ``slow.layers.N.*`` (attention.wqkv / wo / q_norm / k_norm,
                                               attention_norm, ffn_norm, feed_forward.w1 / w2 / w3)
``text_model.model.norm.weight``               ``slow.norm.weight``
``text_model.model.output.weight``             ``slow.output.weight`` (only when embeddings are untied)
``audio_decoder.codebook_embeddings.weight``   ``slow.codebook_embeddings.weight`` (the slow model's code
                                               table, although the release files it under the decoder)
``audio_decoder.X`` (any other)                ``fast.X``: embeddings, layers.M.*, norm, output,
                                               project_in (only when the fast dim differs)
=============================================  ==========================================================

The config (``model_type`` ``fish_qwen3_omni``) is read as upstream reads it: sizes from
``text_config`` and ``audio_decoder_config``; RoPE base and norm eps of both models from ``text_config``;
``scale_codebook_embeddings`` and the post-norm fast input forced on; one shared fast embedding table
and head. ``semantic_begin_id`` / ``semantic_end_id`` come from the ``<|semantic:i|>`` tokens of the
tokenizer beside the weights, and from the config only when there is no tokenizer.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.runs import atomic_path, write_text_atomic
from s2train.text.tokenizer import ByteTokenizer, HFTokenizer, TextTokenizer

IM_END, PAD = "<|im_end|>", "<|pad|>"


@dataclass(frozen=True)
class FishDualARInfo:
    """What ``load_fish_dual_ar`` found besides the weights."""

    folder: Path
    semantic_begin_id: int
    semantic_end_id: int
    semantic_ids_from: str  # "tokenizer" or "config"
    im_end_id: int  # ends an assistant turn; the only non-semantic token generation may choose
    pad_id: int | None
    weight_files: tuple[str, ...]  # safetensors files read, in order


# (official prefix, our prefix), the most specific first: the table above as a rename both ways
KEY_PREFIXES = (
    ("audio_decoder.codebook_embeddings.", "slow.codebook_embeddings."),
    ("text_model.model.", "slow."),
    ("audio_decoder.", "fast."),
)


def _rename(key: str, pairs) -> str | None:
    return next((new + key.removeprefix(old) for old, new in pairs if key.startswith(old)), None)


def official_to_ours(key: str) -> str | None:
    """One official checkpoint key -> our ``DualAR.state_dict()`` key (table above); None if foreign."""
    return _rename(key, KEY_PREFIXES)


def ours_to_official(key: str) -> str:
    """One key of ``DualAR.state_dict()`` -> its official name (the inverse of ``official_to_ours``)."""
    official = _rename(key, [(ours, theirs) for theirs, ours in KEY_PREFIXES])
    if official is None:
        raise ValueError(f"{key} is not a key of s2train's Dual-AR model")
    return official


def require_fish_qwen3_omni(cfg: dict[str, Any], where: str) -> None:
    if cfg.get("model_type") != "fish_qwen3_omni":
        raise ValueError(
            f"{where} has model_type {cfg.get('model_type')!r}, not 'fish_qwen3_omni': "
            "it is not a Fish Audio S2 Pro release"
        )


def dual_ar_config_from_fish(
    cfg: dict[str, Any],
    semantic_begin_id: int,
    semantic_end_id: int,
    residual_codebook_size: int | None = None,
) -> DualARConfig:
    """Our ``DualARConfig`` from a ``fish_qwen3_omni`` config.json and the semantic ids.

    ``residual_codebook_size`` defaults to the fast vocabulary, which is upstream's behaviour (no
    residual masking); pass the codec's residual codebook size (1024 for S2 Pro) to mask impossible codes.
    """
    require_fish_qwen3_omni(cfg, "config.json")

    def need(section: str, key: str) -> Any:
        part = cfg.get(section)
        if not isinstance(part, dict) or key not in part:
            raise ValueError(f"the S2 Pro config.json has no {section}.{key}")
        return part[key]

    for section in ("text_config", "audio_decoder_config"):
        part = cfg.get(section, {})
        for flag in ("attention_qkv_bias", "attention_o_bias", "use_moe"):
            if part.get(flag, False):
                raise ValueError(
                    f"the S2 Pro config sets {section}.{flag}, which s2train's Dual-AR does not build"
                )
        if part.get("dropout", 0.0):
            raise ValueError(f"the S2 Pro config sets {section}.dropout; s2train's Dual-AR has no dropout")

    def heads(section: str) -> tuple[int, int, int]:
        n_head, dim = need(section, "n_head"), need(section, "dim")
        kv = cfg[section].get("n_local_heads", -1)
        return n_head, n_head if kv == -1 else kv, cfg[section].get("head_dim") or dim // n_head

    n_heads, n_kv_heads, head_dim = heads("text_config")
    fast_n_heads, fast_n_kv_heads, fast_head_dim = heads("audio_decoder_config")
    codebook_size = need("audio_decoder_config", "vocab_size")
    text = cfg["text_config"]
    return DualARConfig(
        vocab_size=need("text_config", "vocab_size"),
        dim=need("text_config", "dim"),
        n_layers=need("text_config", "n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        intermediate_size=need("text_config", "intermediate_size"),
        num_codebooks=need("audio_decoder_config", "num_codebooks"),
        codebook_size=codebook_size,
        residual_codebook_size=residual_codebook_size or codebook_size,
        semantic_begin_id=semantic_begin_id,
        semantic_end_id=semantic_end_id,
        fast_n_layers=need("audio_decoder_config", "n_layer"),
        fast_dim=need("audio_decoder_config", "dim"),
        fast_n_heads=fast_n_heads,
        fast_n_kv_heads=fast_n_kv_heads,
        fast_head_dim=fast_head_dim,
        fast_intermediate_size=need("audio_decoder_config", "intermediate_size"),
        rope_base=float(text.get("rope_base", 10000.0)),
        rope_table_dtype="bfloat16",
        norm_eps=float(text.get("norm_eps", 1e-6)),
        qk_norm=bool(text.get("attention_qk_norm", False)),
        fast_qk_norm=bool(cfg["audio_decoder_config"].get("attention_qk_norm", False)),
        tie_embeddings=bool(text.get("tie_word_embeddings", True)),
        max_seq_len=need("text_config", "max_seq_len"),
        scale_codebook_embeddings=True,  # forced by upstream for this model type
        fast_shared_embeddings=True,
        fast_shared_head=True,
        init_std=float(text.get("initializer_range", 0.02)),
    )


def read_fish_weights(folder: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Official key -> tensor from ``model.safetensors.index.json`` and its shards, else ``model.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = tuple(sorted(set(weight_map.values())))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            if not (folder / name).is_file():
                raise ValueError(f"{index} names the shard {name}, which is not in {folder}")
            shard = load_file(folder / name)
            listed = {key for key, file in weight_map.items() if file == name}
            if set(shard) != listed:
                raise ValueError(
                    f"shard {name} does not hold what {index.name} says: unlisted "
                    f"{sorted(set(shard) - listed)[:5]}, absent {sorted(listed - set(shard))[:5]}"
                )
            state.update(shard)
        return state, files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    return load_file(single), (single.name,)


def load_fish_dual_ar(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tokenizer_folder: str | Path | None = None,
    residual_codebook_size: int | None = None,
) -> tuple[DualAR, FishDualARInfo]:
    """A ``DualAR`` in eval mode with the released weights of an S2 Pro folder, and what else it found.

    The weights (bf16 in the release) are cast to ``dtype`` (float32 by default). Every official key must
    map onto a parameter of the right shape and every parameter must be loaded, or a ValueError names the
    missing, unexpected and mis-shaped keys. Token ids come from ``tokenizer_folder`` (default: the folder).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json: it is not a Fish Audio S2 Pro release folder")
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    require_fish_qwen3_omni(cfg, str(config_path))

    tokenizer_dir = Path(tokenizer_folder) if tokenizer_folder is not None else folder
    if (tokenizer_dir / "tokenizer.json").is_file():  # semantic ids as the tokenizer has them (upstream)
        tokenizer = HFTokenizer(tokenizer_dir)
        semantic, source = (tokenizer.semantic_begin, tokenizer.semantic_end), "tokenizer"
        im_end_id, pad_id = tokenizer.token_id(IM_END), tokenizer.token_id(PAD)
    else:  # no tokenizer: upstream's fallback to the ids config.json records
        if "semantic_start_token_id" not in cfg or "semantic_end_token_id" not in cfg:
            raise ValueError(
                f"no tokenizer.json beside {folder}, and config.json has no "
                "semantic_start_token_id / semantic_end_token_id"
            )
        semantic, source = (cfg["semantic_start_token_id"], cfg["semantic_end_token_id"]), "config"
        im_end_id, pad_id = cfg.get("eos_token_id"), cfg.get("pad_token_id")
        if im_end_id is None:
            raise ValueError(f"neither a tokenizer nor config.json beside {folder} gives the <|im_end|> id")
    config = dual_ar_config_from_fish(cfg, *semantic, residual_codebook_size)

    official, files = read_fish_weights(folder)
    state, foreign = {}, []
    for key in sorted(official):
        value = official.pop(key)  # drop each stored tensor once cast: one copy of the weights at a time
        ours = official_to_ours(key)
        if ours is None:
            foreign.append(key)
        else:
            state[ours] = value.to(dtype)
    with torch.device("meta"):
        model = DualAR(config)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(foreign + [key for key in state if key not in expected])
    misshaped = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(shape)})"
        for key, shape in expected.items()
        if key in state and state[key].shape != shape
    ]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"the weights in {folder} do not match the model its config.json describes: "
            f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} "
            f"({len(unexpected)} in all), wrong shape {misshaped[:5]} ({len(misshaped)} in all)"
        )
    model.load_state_dict(state, strict=True, assign=True)
    info = FishDualARInfo(
        folder=folder,
        semantic_begin_id=config.semantic_begin_id,
        semantic_end_id=config.semantic_end_id,
        semantic_ids_from=source,
        im_end_id=int(im_end_id),
        pad_id=pad_id,
        weight_files=files,
    )
    return model.to(device).eval(), info


# -------------------------------------------------------------------------------------------- export


def check_exportable(config: DualARConfig) -> None:
    """Refuse a model the released layout cannot describe: upstream builds every ``fish_qwen3_omni``
    model with bf16-rounded RoPE tables, scaled codebook embeddings and one shared fast table and head."""
    forced = {
        "rope_table_dtype": "bfloat16",
        "scale_codebook_embeddings": True,
        "fast_shared_embeddings": True,
        "fast_shared_head": True,
    }
    differ = {k: getattr(config, k) for k, v in forced.items() if getattr(config, k) != v}
    if differ:
        wanted = ", ".join(f"{k}={forced[k]}" for k in differ)
        raise ValueError(
            f"this model cannot be written in the released S2 Pro layout, which always builds {wanted}; "
            f"the model has {differ} (a model trained with these settings keeps our format)"
        )


def fish_config(config: DualARConfig, tokenizer: TextTokenizer) -> dict[str, Any]:
    """The ``config.json`` of a ``fish_qwen3_omni`` folder for ``config`` (what ``dual_ar_config_from_fish``
    reads, plus the ids upstream records at the top level)."""

    def part(prefix: str, model_type: str) -> dict[str, Any]:
        f = lambda name: getattr(config, prefix + name)  # noqa: E731
        return {
            "model_type": model_type,
            "dim": f("dim"),
            "n_layer": f("n_layers"),
            "n_head": f("n_heads"),
            "n_local_heads": f("n_kv_heads"),
            "head_dim": f("head_dim"),
            "intermediate_size": f("intermediate_size"),
            "rope_base": config.rope_base,
            "norm_eps": config.norm_eps,
            "initializer_range": config.init_std,
            "attention_qkv_bias": False,
            "attention_o_bias": False,
            "dropout": 0.0,
            "use_moe": False,
        }

    def optional(name: str) -> int | None:
        try:
            return tokenizer.token_id(name)
        except KeyError:
            return None

    text = {
        **part("", "fish_qwen3"),
        "vocab_size": config.vocab_size,
        "attention_qk_norm": config.qk_norm,
        "tie_word_embeddings": config.tie_embeddings,
        "max_seq_len": config.max_seq_len,
    }
    audio = {
        **part("fast_", "fish_qwen3_audio_decoder"),
        "vocab_size": config.codebook_size,
        "num_codebooks": config.num_codebooks,
        "attention_qk_norm": config.fast_qk_norm,
        "tie_word_embeddings": False,
        "max_seq_len": config.num_codebooks + 1,
        "text_dim": config.dim,
    }
    return {
        "model_type": "fish_qwen3_omni",
        "text_config": text,
        "audio_decoder_config": audio,
        "semantic_start_token_id": config.semantic_begin_id,
        "semantic_end_token_id": config.semantic_end_id,
        "eos_token_id": tokenizer.token_id(IM_END),
        "pad_token_id": optional(PAD),
        "audio_pad_token_id": optional("<|audio_pad|>"),
        "dtype": "float32",
    }


def save_fish_dual_ar(
    state: dict[str, torch.Tensor],
    config: DualARConfig,
    tokenizer: TextTokenizer,
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write our model (its ``state_dict`` and config) as a released ``fish_qwen3_omni`` folder:
    ``config.json``, ``model.safetensors`` with the official key names (in ``dtype``; float32 keeps the
    weights exact, bfloat16 is the release's own and halves the size) and the tokenizer files, so that
    ``load_fish_dual_ar`` (and upstream's loader) builds the same model. A tied LM head is written once,
    as the embeddings, as upstream stores it."""
    check_exportable(config)
    if (tokenizer.semantic_begin, tokenizer.semantic_end) != (
        config.semantic_begin_id,
        config.semantic_end_id,
    ):
        raise ValueError(
            f"the tokenizer's semantic ids {tokenizer.semantic_begin}..{tokenizer.semantic_end} are not the "
            f"model's {config.semantic_begin_id}..{config.semantic_end_id}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    official = {ours_to_official(k): v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    cfg = fish_config(config, tokenizer)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(official, str(tmp), metadata={"format": "pt"})
    write_text_atomic(folder / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer.save_hf(folder)
    elif isinstance(tokenizer, HFTokenizer):
        tokenizer.copy_to(folder)
    else:
        raise ValueError(f"cannot write a {type(tokenizer).__name__} as a Hugging Face tokenizer")
    return folder
