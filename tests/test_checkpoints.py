"""``s2train.checkpoints``, the one place models are opened and saved: our codec and Dual-AR formats round
trip exactly, a released S2 Pro folder opens through the same calls, and anything else is refused with a
sentence that says what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from s2train.checkpoints import load_codec, open_codec, open_dual_ar, save_codec, save_dual_ar
from s2train.models.codec import Codec
from s2train.models.codec import tiny as codec_tiny
from s2train.models.dual_ar import DualAR, tiny

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fish_s2"  # released S2 Pro formats, tiny weights


def test_our_dual_ar_round_trips_exactly(tmp_path):
    torch.manual_seed(3)
    model = DualAR(tiny())
    save_dual_ar(model.config, model.state_dict(), tmp_path / "run")
    loaded, release = open_dual_ar(tmp_path / "run")
    assert release is None and loaded.config == model.config and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.json", "model.safetensors"]


def test_our_codec_round_trips_from_the_file_or_its_folder(tmp_path):
    torch.manual_seed(4)
    codec = Codec(codec_tiny())
    save_codec(codec, tmp_path / "codec" / "codec.pt")
    for spec in (tmp_path / "codec" / "codec.pt", tmp_path / "codec"):
        opened, name = open_codec(spec)
        assert name == "codec"
        for a, b in zip(codec.state_dict().values(), opened.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert not list((tmp_path / "codec").glob("*.tmp"))  # written atomically


def test_what_is_not_a_checkpoint_is_refused_with_a_sentence(tmp_path):
    with pytest.raises(ValueError, match="synthesize.codec is required"):
        open_codec(None, key="synthesize.codec")
    with pytest.raises(ValueError, match="holds neither codec.pt"):
        open_codec(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        open_codec(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="holds neither model.json"):
        open_dual_ar(tmp_path)
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ValueError, match="no model.safetensors"):
        open_dual_ar(tmp_path)
    (tmp_path / "not_a_codec.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "not_a_codec.pt")
    with pytest.raises(ValueError, match="not an s2train codec checkpoint"):
        load_codec(tmp_path / "not_a_codec.pt")


def test_released_folders_open_through_the_same_calls():
    model_dir = next(
        p for p in sorted(FIXTURES.rglob("config.json")) if (p.parent / "tokenizer.json").is_file()
    )
    model, release = open_dual_ar(model_dir.parent)
    assert release == model_dir.parent and isinstance(model, DualAR) and not model.training
    codec_pth = next(iter(sorted(FIXTURES.rglob("codec.pth"))))
    codec, name = open_codec(codec_pth.parent)
    assert name.startswith("fish:") and isinstance(codec, Codec)


def test_lora_adapts_the_named_layers_and_refuses_a_pattern_that_matches_none():
    from s2train.checkpoints import LoraSettings, add_lora, lora_targets

    model = DualAR(tiny())
    chosen = lora_targets(model, ["slow.*.attention.wqkv", "*.feed_forward.w2"])
    assert chosen == [f"slow.layers.{i}.attention.wqkv" for i in range(2)] + [
        f"{m}.layers.{i}.feed_forward.w2" for m in ("slow", "fast") for i in range(2)
    ]
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora_targets(model, ["*.attention.q_proj"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraSettings(r=2, target_modules=["slow.*.attention.wqkv"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and n.startswith("slow.") for n in trainable)
    state = model.state_dict()
    for key, value in before.items():  # every original weight, under peft's base_layer where adapted
        assert torch.equal(state.get(key, state.get(key.replace(".weight", ".base_layer.weight"))), value)
