"""A tiny random Whisper in the Hugging Face ``save_pretrained`` layout, with large-v3's vocabulary, mel bins,
special-token ids and generation settings, built offline: the tokenizer from openai-whisper's bundled
vocabulary (tiktoken) through transformers' converter, the weights from a seeded generator in the order of
the parameter names (the same weights from any transformers version that names them the same).

Used by ``tests/test_whisper_official.py`` and by ``tests/fixtures/whisper_official/make_references.py``,
which runs the official Seed-TTS-Eval call on an older transformers release."""

from __future__ import annotations

import json
import os
from pathlib import Path

SEED = 0
STD = 0.05  # the weights' spread (layer-norm gains: 1 + 2 x this)
END_SCALE = -2.5  # <|endoftext|>'s row, scaled: one clip's transcript ends, the others run to the limit


def generation_settings() -> dict:
    """large-v3's Whisper generation settings, from openai-whisper's tokenizer (the ids are large-v3's)."""
    import whisper.tokenizer as wt

    t = wt.get_tokenizer(True, num_languages=100, language="en", task="transcribe")
    languages = {
        f"<|{code}|>": t.encoding.encode_single_token(f"<|{code}|>") for code in t.all_language_codes
    }
    return {
        "decoder_start_token_id": t.sot,
        "bos_token_id": t.eot,
        "eos_token_id": t.eot,
        "pad_token_id": t.eot,
        "max_length": 448,
        "suppress_tokens": sorted(t.non_speech_tokens),
        "begin_suppress_tokens": [220, t.eot],
        "no_timestamps_token_id": t.no_timestamps,
        "is_multilingual": True,
        "lang_to_id": languages,
        "task_to_id": {"transcribe": t.transcribe, "translate": t.translate},
        "forced_decoder_ids": [[1, None], [2, t.transcribe]],
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
    }


def save_tokenizer(folder: Path) -> None:
    """tokenizer.json (+ its config) of openai-whisper's multilingual vocabulary, large-v3's 100 languages."""
    import whisper.tokenizer as wt
    from transformers import WhisperTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = wt.get_encoding("multilingual", num_languages=100)
    vocabulary = os.path.join(os.path.dirname(wt.__file__), "assets", "multilingual.tiktoken")
    converted = TikTokenConverter(
        vocab_file=vocabulary, pattern=encoding._pat_str, extra_special_tokens=encoding._special_tokens
    ).converted()
    converted.save(str(folder / "tokenizer.json"))
    converted.model.save(str(folder))  # vocab.json and merges.txt, for the slow WhisperTokenizer
    specials = sorted(encoding._special_tokens.items(), key=lambda kv: kv[1])
    end = "<|endoftext|>"
    others = [name for name, _ in specials if name != end]
    common = {"bos_token": end, "eos_token": end, "pad_token": end, "unk_token": end}
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**common, "additional_special_tokens": others})
    )
    config = {  # the shape of the released large-v3 folder's, which every transformers release reads
        **common,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 1024,
        "tokenizer_class": "WhisperTokenizer",
        "additional_special_tokens": others,
        "added_tokens_decoder": {
            str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for name, i in specials
        },
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    tokenizer = WhisperTokenizerFast.from_pretrained(str(folder))
    for name, i in specials:
        assert tokenizer.convert_tokens_to_ids(name) == i, (name, i)


def build_model():
    """The tiny random model (1 encoder and 1 decoder layer of width 64, large-v3's 128 mel bins and 51,866
    ids); every weight drawn from N(0, 0.05) by one seeded generator, parameter by parameter in name order;
    the row of ``<|endoftext|>`` scaled (``END_SCALE``) so that one transcript ends and the others run to the
    length limit."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=51866,
        num_mel_bins=128,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=256,  # 4 x d_model: the only width openai-whisper builds
        decoder_ffn_dim=256,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=50258,
        eos_token_id=50257,
        pad_token_id=50257,
        bos_token_id=50257,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    model = WhisperForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if name.endswith("layer_norm.weight") else STD * noise)
        embeddings = model.model.decoder.embed_tokens.weight  # tied to the output projection
        embeddings[50257] *= END_SCALE
    return model


def save_model(folder: str | Path) -> Path:
    """The whole folder: model, generation settings, feature extractor and tokenizer."""
    from transformers import GenerationConfig, WhisperFeatureExtractor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model()
    model.generation_config = GenerationConfig(**generation_settings())
    model.save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=128).save_pretrained(str(folder))
    save_tokenizer(folder)
    return folder


def clips() -> dict[str, tuple]:
    """Deterministic test clips (name -> (samples, rate)): noise, tones and chirps at 16, 24 and 44.1 kHz
    (the official call resamples all but the first), short and long."""
    import numpy as np

    rng = np.random.default_rng(7)
    out = {}
    for i, (rate, seconds) in enumerate(
        [(16000, 1.2), (24000, 2.5), (44100, 0.8), (22050, 6.0), (16000, 12.0), (24000, 3.3)]
    ):
        t = np.arange(int(rate * seconds)) / rate
        tone = 0.3 * np.sin(2 * np.pi * (180 + 90 * i) * t * (1 + 0.3 * t))
        out[f"clip-{i}"] = ((tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32), rate)
    return out


def write_clips(folder: str | Path) -> Path:
    """``clips()`` as 16-bit WAV files (what the official script reads with soundfile)."""
    import soundfile as sf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (samples, rate) in clips().items():
        sf.write(folder / f"{name}.wav", samples, rate, subtype="PCM_16")
    return folder


def save_openai_checkpoint(folder: str | Path, path: str | Path) -> Path:
    """The same model in openai-whisper's layout (``{"dims", "model_state_dict"}``, its parameter names)."""
    import re
    from dataclasses import asdict

    import torch
    from transformers import WhisperForConditionalGeneration
    from whisper.model import ModelDimensions

    model = WhisperForConditionalGeneration.from_pretrained(str(folder))
    c = model.config
    dims = ModelDimensions(
        n_mels=c.num_mel_bins, n_audio_ctx=c.max_source_positions, n_audio_state=c.d_model,
        n_audio_head=c.encoder_attention_heads, n_audio_layer=c.encoder_layers, n_vocab=c.vocab_size,
        n_text_ctx=c.max_target_positions, n_text_state=c.d_model, n_text_head=c.decoder_attention_heads,
        n_text_layer=c.decoder_layers,
    )  # fmt: skip
    renames = [
        (r"^model\.encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
        (r"^model\.decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
        (r"^model\.decoder\.embed_tokens\.", "decoder.token_embedding."),
        (r"^model\.encoder\.layer_norm\.", "encoder.ln_post."),
        (r"^model\.decoder\.layer_norm\.", "decoder.ln."),
        (r"^model\.(encoder|decoder)\.layers\.", r"\1.blocks."),
        (r"^model\.encoder\.", "encoder."),
        (r"\.self_attn\.", ".attn."),
        (r"\.encoder_attn\.", ".cross_attn."),
        (r"\.self_attn_layer_norm\.", ".attn_ln."),
        (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
        (r"\.final_layer_norm\.", ".mlp_ln."),
        (r"\.fc1\.", ".mlp.0."),
        (r"\.fc2\.", ".mlp.2."),
        (r"\.q_proj\.", ".query."),
        (r"\.k_proj\.", ".key."),
        (r"\.v_proj\.", ".value."),
        (r"\.out_proj\.", ".out."),
    ]
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "proj_out.weight":  # tied to the token embedding
            continue
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        state[name] = tensor.clone()
    torch.save({"dims": asdict(dims), "model_state_dict": state}, str(path))
    return Path(path)
