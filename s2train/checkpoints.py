"""Opening and saving models: the one place every stage goes through for the codec and the Dual-AR model.

Formats:

- **Our codec**: one file, ``codec.pt`` (``{"codec_config", "state_dict"}``), written by ``stage=codec`` and
  read with ``torch.load(weights_only=True)``, so no code is unpickled.
- **Our Dual-AR model**: a folder (a pretrain run directory) with ``model.safetensors`` (our key names) and
  ``model.json`` (its ``DualARConfig``).
- **Released S2 Pro**: the codec folder (``codec.pth`` and its config) and the ``fish_qwen3_omni`` model
  folder (``config.json``, safetensors, ``tokenizer.json``), converted by ``s2train.compat``.

- **LoRA adapter**: a folder with peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (the
  adapter alone, small) and ``adapter.json`` naming the model it adapts, written by ``stage=finetune``.
  ``add_lora`` puts peft's LoRA layers into a ``DualAR`` from outside the model code.

``open_codec`` and ``open_dual_ar`` accept any of these and say which they found; ``export_release``
writes any Dual-AR model back into the released ``fish_qwen3_omni`` layout.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from s2train.checks import check
from s2train.compat.fish_codec import load_fish_codec
from s2train.compat.fish_dual_ar import load_fish_dual_ar, save_fish_dual_ar
from s2train.models.codec import Codec, CodecConfig
from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.runs import UMASK, atomic_path, write_json_atomic, write_text_atomic
from s2train.text.tokenizer import HFTokenizer

if TYPE_CHECKING:
    from peft import PeftModel

    from s2train.text.tokenizer import TextTokenizer

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


def save_dual_ar(
    config: DualARConfig, state: dict[str, torch.Tensor], folder: Path, tokenizer: TextTokenizer | None = None
) -> None:
    """``model.safetensors`` (our key names) and ``model.json`` (its ``DualARConfig``) in ``folder``.
    ``state`` is the model's full state dict on CPU (``trainer.gathered_state_dict`` under ZeRO-3). A
    Hugging Face ``tokenizer`` (a released model's) is copied beside them, so the model is opened with
    the token ids it was trained on; the byte tokenizer is the config's ``text`` and needs no file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.copy_to(folder)
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
    Pro folder, in eval mode; also the folder whose ``tokenizer.json`` goes with it: a release's, or a run's
    that trained from one (else None: the config's ``text`` tokenizer)."""
    folder = Path(spec)
    if (folder / "adapter_config.json").is_file():
        return open_adapter(folder, device=device, dtype=dtype, residual_codebook_size=residual_codebook_size)
    if (folder / "model.json").is_file():
        if not (folder / "model.safetensors").is_file():
            raise ValueError(f"{folder} has model.json but no model.safetensors")
        model = DualAR(DualARConfig(**json.loads((folder / "model.json").read_text(encoding="utf-8"))))
        model.load_state_dict(load_file(folder / "model.safetensors"))
        tokenizer = folder if (folder / "tokenizer.json").is_file() else None  # trained from a release
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    if (folder / "config.json").is_file():
        model, _ = load_fish_dual_ar(
            folder, dtype=dtype, device=torch.device(device), residual_codebook_size=residual_codebook_size
        )
        return model, folder
    raise ValueError(
        f"{key}={spec} holds neither model.json + model.safetensors (a pretrain run), config.json (a "
        "released S2 Pro folder) nor adapter_config.json (a LoRA adapter)"
    )


# --------------------------------------------------------------------------------------------- LoRA

# Every projection of the slow and the fast model's attention and MLP; "slow.*" or "fast.*" picks one.
LORA_TARGETS = (
    "*.attention.wqkv",
    "*.attention.wo",
    "*.feed_forward.w1",
    "*.feed_forward.w2",
    "*.feed_forward.w3",
)


@dataclass
class LoraSettings:
    """LoRA (peft's ``LoraConfig``) on the linear layers of a ``DualAR`` whose names match
    ``target_modules`` (globs over ``model.named_modules()``, e.g. ``slow.layers.*.attention.wqkv``)."""

    r: int = 16  # rank
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input; > 0 makes a resumed run draw other masks than a whole one
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        check(self.r >= 1, f"finetune.lora.r must be at least 1, not {self.r}")
        check(self.alpha > 0, "finetune.lora.alpha must be positive")
        check(0 <= self.dropout < 1, f"finetune.lora.dropout must be in [0, 1), not {self.dropout}")
        check(bool(self.target_modules), "finetune.lora.target_modules is empty: name the layers to adapt")


def lora_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """The names of ``model``'s ``nn.Linear`` layers that ``patterns`` match; a pattern that matches none
    is refused with the names it could have matched."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = []
    for pattern in patterns:
        hits = [name for name in linear if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"finetune.lora.target_modules: {pattern!r} matches no linear layer of the model; its linear "
                f"layers are named like {linear[:4]} ({len(linear)} in all)"
            )
        chosen += [name for name in hits if name not in chosen]
    return chosen


def add_lora(model: DualAR, settings: LoraSettings) -> PeftModel:
    """Put LoRA adapters into ``model`` in place (peft's ``get_peft_model``): every weight of the model is
    frozen and only the adapters train. ``model`` keeps working as a ``DualAR``; the returned
    ``PeftModel`` saves the adapter (``save_pretrained``) and merges it (``merge_and_unload``)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, settings.target_modules)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,  # exact names: peft adapts exactly these layers
        bias="none",
    )
    return get_peft_model(model, config)


def save_adapter(
    state: dict[str, torch.Tensor],
    config: DualARConfig,
    settings: LoraSettings,
    base: str | Path,
    folder: Path,
) -> dict[str, torch.Tensor]:
    """From the weights of a model with adapters (``add_lora``'s, its ``state_dict``): the adapter alone
    into ``folder`` (peft's files, and ``adapter.json`` naming ``base``, the model it adapts), and the
    merged weights returned as a plain ``DualAR`` state dict."""
    with torch.device("cpu"):
        model = DualAR(config)
    adapted = add_lora(model, settings)
    model.load_state_dict(state)
    folder.mkdir(parents=True, exist_ok=True)
    adapted.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card template: nothing of ours in it
    for written in folder.iterdir():  # peft's safetensors file is made 0600; share it as our files are
        written.chmod(0o666 & ~UMASK)
    write_json_atomic(
        folder / "adapter.json",
        {
            "base": str(Path(base).resolve()),
            "lora": dataclasses.asdict(settings),
            "model": dataclasses.asdict(config),
        },
    )
    merged = adapted.merge_and_unload()
    return {k: v.detach().contiguous() for k, v in merged.state_dict().items()}


def open_adapter(
    folder: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    residual_codebook_size: int | None = None,
) -> tuple[DualAR, Path | None]:
    """A LoRA adapter folder's base model (``adapter.json``'s ``base``, opened by ``open_dual_ar``) with the
    adapter merged into its weights (merged in float32, then cast to ``dtype``)."""
    from peft import PeftModel

    note = folder / "adapter.json"
    if not note.is_file():
        raise ValueError(f"{folder} has adapter_config.json but no adapter.json naming the model it adapts")
    base = Path(json.loads(note.read_text(encoding="utf-8"))["base"])
    if not base.exists():
        raise ValueError(f"the adapter in {folder} adapts {base}, which no longer exists")
    model, release = open_dual_ar(base, residual_codebook_size=residual_codebook_size, key=f"{note} base")
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return merged.to(device=device, dtype=dtype).eval(), release


# ------------------------------------------------------------------------------------------ export


def export_release(
    model: DualAR, tokenizer: TextTokenizer, folder: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """``model`` (and its tokenizer) as a released S2 Pro ``fish_qwen3_omni`` folder, which
    ``open_dual_ar`` and upstream's loader read (``s2train.compat.fish_dual_ar.save_fish_dual_ar``)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_fish_dual_ar(state, model.config, tokenizer, folder, dtype=dtype)
