"""Opening and saving models: the one place every stage goes through for the codec and the Dual-AR model.

Formats:

- **Our codec**: one file, ``codec.pt`` (``{"codec_config", "state_dict"}``), written by ``stage=codec`` and
  read with ``torch.load(weights_only=True)``, so no code is unpickled.
- **Our Dual-AR model**: a folder (a pretrain run directory) with ``model.safetensors`` (our key names) and
  ``model.json`` (its ``DualARConfig``).
- **Released S2 Pro**: the codec folder (``codec.pth`` and its config) and the ``fish_qwen3_omni`` model
  folder (``config.json``, safetensors, ``tokenizer.json``), converted by ``s2train.compat``.

``open_codec`` and ``open_dual_ar`` accept any of these and say which they found; LoRA adapters and
exports to the released layout extend this module.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from s2train.compat.fish_codec import load_fish_codec
from s2train.compat.fish_dual_ar import load_fish_dual_ar
from s2train.models.codec import Codec, CodecConfig
from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.runs import atomic_path, write_text_atomic

# ---------------------------------------------------------------------------------------------- codec


def save_codec(codec: Codec, path: str | Path) -> None:
    """Our codec format: the config as plain values and the weights, loadable with weights_only."""
    with atomic_path(Path(path)) as tmp:
        torch.save({"codec_config": dataclasses.asdict(codec.config), "state_dict": codec.state_dict()}, tmp)


def load_codec(path: str | Path) -> Codec:
    """A codec saved by ``save_codec`` (``torch.load(weights_only=True)``: no code is unpickled)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "codec_config" not in checkpoint:
        raise ValueError(f"{path} is not an s2train codec checkpoint (no codec_config)")
    codec = Codec(CodecConfig(**checkpoint["codec_config"]))
    codec.load_state_dict(checkpoint["state_dict"])
    return codec.eval()


def open_codec(spec: str | Path | None, key: str = "tokenize.codec") -> tuple[Codec, str]:
    """``(codec, name)`` in eval mode from our checkpoint file, a folder holding one (``codec.pt``), or a
    released S2 Pro codec (a folder with ``codec.pth`` and its config, or the ``.pth`` itself). ``key``
    names the config field in error messages."""
    if not spec:
        raise ValueError(
            f"{key} is required: a codec checkpoint written by stage=codec (runs/<name>/codec/codec.pt) "
            "or a folder with the released S2 Pro codec.pth"
        )
    path = Path(spec)
    if path.is_dir():
        if (path / "codec.pt").is_file():
            return load_codec(path / "codec.pt"), path.name
        if (path / "codec.pth").is_file():
            return load_fish_codec(path).eval(), f"fish:{path.name}"
        raise ValueError(f"{path} holds neither codec.pt (s2train) nor codec.pth (released S2 Pro codec)")
    if not path.is_file():
        raise ValueError(f"{key}={spec} does not exist")
    if path.suffix == ".pth":
        return load_fish_codec(path).eval(), f"fish:{path.stem}"
    return load_codec(path), path.stem


def codec_files(spec: str | Path) -> list[Path]:
    """The files ``open_codec(spec)`` reads: ``codec.pt``, or a released ``codec.pth`` and the
    ``config.json`` beside it (which may describe the Dual-AR model instead; it is read either way)."""
    path = Path(spec)
    if path.is_dir():
        ours = path / "codec.pt"
        weights = ours if ours.is_file() else path / "codec.pth"
    else:
        weights = path
    files = [weights]
    if weights.suffix == ".pth" and (weights.parent / "config.json").is_file():
        files.append(weights.parent / "config.json")
    return files


# ------------------------------------------------------------------------------------------ Dual-AR


def save_dual_ar(config: DualARConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """``model.safetensors`` (our key names) and ``model.json`` (its ``DualARConfig``) in ``folder``.
    ``state`` is the model's full state dict on CPU (``trainer.gathered_state_dict`` under ZeRO-3)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    write_text_atomic(folder / "model.json", json.dumps(dataclasses.asdict(config), indent=1))


def open_dual_ar(
    spec: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    residual_codebook_size: int | None = None,
    key: str = "synthesize.model",
) -> tuple[DualAR, Path | None]:
    """The model of a pretrain run directory (``model.json`` + ``model.safetensors``) or of a released S2
    Pro folder, in eval mode; also, for a release, the folder whose tokenizer goes with it (else None)."""
    folder = Path(spec)
    if (folder / "model.json").is_file():
        if not (folder / "model.safetensors").is_file():
            raise ValueError(f"{folder} has model.json but no model.safetensors")
        model = DualAR(DualARConfig(**json.loads((folder / "model.json").read_text(encoding="utf-8"))))
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.to(device=device, dtype=dtype).eval(), None
    if (folder / "config.json").is_file():
        model, _ = load_fish_dual_ar(
            folder, dtype=dtype, device=torch.device(device), residual_codebook_size=residual_codebook_size
        )
        return model, folder
    raise ValueError(
        f"{key}={spec} holds neither model.json + model.safetensors (a pretrain run) nor config.json (a "
        "released S2 Pro folder)"
    )
