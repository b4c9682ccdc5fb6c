"""Speech recognition judges and the filters that catch hallucinated transcripts.

Three backends behind one call, ``asr(wavs, langs) -> list[Transcript]`` on 16 kHz mono audio:

- ``whisper``: openai-whisper loaded from a local checkpoint file (``torch.load(weights_only=True)``,
  never a hub name); detects the language and its probability, gives word times and log-probabilities.
- ``paraformer``: Paraformer-zh through funasr (the ``zh`` extra) from a local model folder; Mandarin
  only, text without word times or scores.
- ``pocketsphinx``: English only, fully offline (its model ships in the wheel). One decoder carries
  cepstral state from one utterance to the next, so each utterance gets a fresh decoder.

A missing local model is refused by ``check_paths`` (which the backends call, and which
``JudgeSuite.check_paths`` runs before anything loads) with a sentence naming the config key.
"""

from __future__ import annotations

import inspect
import multiprocessing
import re
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from s2train.checks import check
from s2train.judges import JUDGE_RATE


@dataclass
class WhisperConfig:
    checkpoint: str | None = None  # a local openai-whisper .pt file; never a hub name
    language: str | None = None  # None: detect
    temperature: float = 0.0
    beam_size: int | None = None


@dataclass
class ASRConfig:
    backend: str = "pocketsphinx"  # pocketsphinx | whisper | whisper_hf | faster_whisper | paraformer
    whisper: WhisperConfig = field(default_factory=WhisperConfig)
    whisper_hf: str | None = None  # whisper_hf: a local Whisper folder in the save_pretrained layout
    faster_whisper: str | None = None  # faster_whisper: a local CTranslate2 Whisper folder (F5-TTS's ASR)
    paraformer: str | None = None  # a local funasr paraformer-zh folder (model.pt, config.yaml, tokens)
    # Filters for hallucinated or unusable transcripts; each one is a reject reason.
    max_ngram_repeats: int = 4  # an n-gram (n = 1..4) repeated back to back more often than this
    min_unique_word_ratio: float = 0.3  # unique words / words, checked from 8 words on
    phantom_phrases: list[str] = field(
        default_factory=lambda: [
            "thank you for watching",
            "thanks for watching",
            "please subscribe",
            "like and subscribe",
            "subtitles by",
            "amara.org",
            "transcribed by",
            "字幕",
            "请不吝点赞",
        ]
    )
    max_compression_ratio: float = 2.4
    min_avg_logprob: float = -1.0  # whisper only: pocketsphinx scores are not log-probabilities
    languages: list[str] = field(default_factory=list)  # keep only these languages; empty keeps all
    # pocketsphinx: decode this many utterances at once, each in a process of its own (its decoder holds
    # the interpreter's lock, so threads would take turns); a batch of one is decoded in-process
    workers: int = 1

    def __post_init__(self) -> None:
        check(
            self.backend in ("pocketsphinx", "whisper", "whisper_hf", "faster_whisper", "paraformer"),
            "judges.asr.backend must be pocketsphinx, whisper, whisper_hf, faster_whisper or paraformer, not "
            f"{self.backend!r}",
        )
        check(self.workers >= 1, f"judges.asr.workers must be at least 1, not {self.workers}")


# backend -> (its ASRConfig field, eval's key, what it must be, how a path is checked)
LOCAL_MODELS = {
    "whisper": ("whisper.checkpoint", "eval.whisper", "a local openai-whisper checkpoint file (e.g. "
                "/models/whisper/large-v3.pt)", lambda p: p.is_file()),
    "whisper_hf": ("whisper_hf", "eval.whisper_hf", "a local Whisper folder in the save_pretrained layout (e.g. "
                   "/models/whisper-large-v3)", lambda p: (p / "config.json").is_file()),
    "faster_whisper": ("faster_whisper", "eval.faster_whisper", "a local CTranslate2 Whisper folder (model.bin, "
                       "tokenizer.json; e.g. faster-whisper-large-v3)", lambda p: (p / "model.bin").is_file()),
    "paraformer": ("paraformer", "eval.paraformer", "a local paraformer-zh model folder (funasr's model.pt, "
                   "config.yaml, tokens)", lambda p: p.is_dir()),
}  # fmt: skip


def check_paths(cfg: ASRConfig) -> None:
    """The ValueError building this backend would raise for a missing local model, without building it."""
    if cfg.backend not in LOCAL_MODELS:
        return
    key, eval_key, what, present = LOCAL_MODELS[cfg.backend]
    value = cfg.whisper.checkpoint if key == "whisper.checkpoint" else getattr(cfg, key)
    if not value or not present(Path(value)):
        raise ValueError(
            f"judges.asr.{key} ({eval_key} in stage=eval) must be {what}; got {value!r}. "
            "Hub names are not downloaded."
        )


@dataclass
class Word:
    word: str
    start: float
    end: float


@dataclass
class Transcript:
    text: str
    lang: str | None
    lang_prob: float | None = None
    avg_logprob: float | None = None
    words: list[Word] = field(default_factory=list)
    supported: bool = True  # False when the backend cannot transcribe this language


def per_language(
    wavs: list[np.ndarray],
    langs: list[str | None],
    languages: tuple[str, ...],
    transcribe: Callable[[np.ndarray, str], Transcript],
) -> list[Transcript]:
    """``transcribe`` each waveform in a language the backend speaks (an unknown language counts as its
    first); any other gets an empty, unsupported transcript."""
    out = []
    for wav, lang in zip(wavs, langs, strict=True):
        lang = lang or languages[0]
        supported = lang in languages
        out.append(transcribe(wav, lang) if supported else Transcript(text="", lang=lang, supported=False))
    return out


class PocketSphinxASR:
    languages = ("en",)

    def __init__(self, cfg: ASRConfig):
        self.cfg = cfg
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, wavs: list[np.ndarray], langs: list[str | None]) -> list[Transcript]:
        if self.cfg.workers == 1 or len(wavs) < 2:
            return per_language(wavs, langs, self.languages, _pocketsphinx)
        if self._pool is None:  # spawned, not forked: the parent may hold torch's threads
            self._pool = ProcessPoolExecutor(
                self.cfg.workers, mp_context=multiprocessing.get_context("spawn")
            )
        pending = per_language(wavs, langs, self.languages, partial(self._pool.submit, _pocketsphinx))
        return [t.result() if isinstance(t, Future) else t for t in pending]


def _pocketsphinx(wav: np.ndarray, lang: str) -> Transcript:
    """One utterance, with a decoder of its own (PocketSphinxASR)."""
    from pocketsphinx import Decoder

    if len(wav) == 0:  # a generation that ended at once: nothing to hear
        return Transcript(text="", lang=lang)
    decoder = Decoder(loglevel="FATAL")
    pcm = (np.clip(wav, -1, 1) * 32767).astype(np.int16).tobytes()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    words = [
        Word(re.sub(r"\(\d+\)$", "", s.word), s.start_frame / 100, (s.end_frame + 1) / 100)
        for s in decoder.seg() or ()  # None when nothing was heard (empty or silent audio)
        if not s.word.startswith(("<", "[")) and s.word != "<sil>"
    ]
    return Transcript(text=" ".join(w.word for w in words), lang=lang, words=words)


class WhisperASR:
    def __init__(self, cfg: ASRConfig, device: str = "cpu"):
        check_paths(cfg)
        import whisper

        self.cfg = cfg
        self.device = device
        self.model = whisper.load_model(str(cfg.whisper.checkpoint), device=device)  # weights_only=True

    def __call__(self, wavs: list[np.ndarray], langs: list[str | None]) -> list[Transcript]:
        import torch
        import whisper

        out = []
        for wav, hint in zip(wavs, langs):
            audio = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), self.model.dims.n_mels).to(
                self.device
            )
            lang = self.cfg.whisper.language or hint
            lang_prob = None
            if self.model.is_multilingual:
                _, probs = self.model.detect_language(mel)
                detected = max(probs, key=probs.get)
                lang = lang or detected
                lang_prob = float(probs.get(lang, 0.0))
            options = {"beam_size": self.cfg.whisper.beam_size} if self.cfg.whisper.beam_size else {}
            result = whisper.transcribe(
                self.model,
                audio,
                language=lang,
                temperature=self.cfg.whisper.temperature,
                condition_on_previous_text=False,
                word_timestamps=True,
                fp16=False,
                verbose=None,
                **options,
            )
            segments = result.get("segments", [])
            tokens = sum(len(s["tokens"]) for s in segments)
            avg_logprob = (
                sum(s["avg_logprob"] * len(s["tokens"]) for s in segments) / tokens if tokens else None
            )
            words = [
                Word(w["word"].strip(), float(w["start"]), float(w["end"]))
                for s in segments
                for w in s.get("words", [])
            ]
            out.append(
                Transcript(
                    text=result["text"].strip(),
                    lang=result.get("language", lang),
                    lang_prob=lang_prob,
                    avg_logprob=avg_logprob,
                    words=words,
                )
            )
        return out

    def transcribe_window(self, wav: np.ndarray, language: str, beam_size: int | None = None) -> str:
        """Seed-TTS-Eval's decoding: one 30 s window (padded or cut), the transcribe task in ``language``,
        no timestamps, fp32; greedy unless ``beam_size`` is given. Returns the text as decoded."""
        import torch
        import whisper

        audio = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), self.model.dims.n_mels)
        options = whisper.DecodingOptions(
            task="transcribe",
            language=language,
            temperature=0.0,
            beam_size=beam_size,
            without_timestamps=True,
            fp16=False,
            sample_len=self.model.dims.n_text_ctx - 4,  # the official call's 448 tokens with its 4 of prompt
        )
        return whisper.decode(self.model, mel.to(self.device), options).text


class TransformersWhisperASR:
    """Seed-TTS-Eval's official English ASR call, reproduced on current transformers: a local Whisper
    folder (``save_pretrained`` layout: large-v3) through ``WhisperProcessor`` features and
    ``WhisperForConditionalGeneration`` in fp32, greedy, with the decoding the official
    ``generate(input_features, forced_decoder_ids=get_decoder_prompt_ids(language="english",
    task="transcribe"))`` does on the transformers releases where that call still runs: the prompt
    ``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``, the folder's ``suppress_tokens`` at
    every step and ``begin_suppress_tokens`` at the first, up to ``max_length`` (448) tokens in all, so
    a run-away transcript gets 444 tokens (openai-whisper stops at 224), and ``batch_decode`` without
    the special tokens. (On current releases that call fails: "model_kwargs not used".) Written as its
    own greedy loop over the model's cached forward, so no release's ``generate`` changes it."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a Whisper folder in the save_pretrained layout (config.json)")
        self.processor = WhisperProcessor.from_pretrained(str(folder))
        model = WhisperForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
        self.model = model.to(device).eval()
        self.device = device
        g, tokenizer = model.generation_config, self.processor.tokenizer
        self.prompt = [
            g.decoder_start_token_id,
            tokenizer.convert_tokens_to_ids("<|en|>"),
            tokenizer.convert_tokens_to_ids("<|transcribe|>"),
            tokenizer.convert_tokens_to_ids("<|notimestamps|>"),
        ]
        self.max_length = g.max_length or model.config.max_target_positions
        self.suppress = list(g.suppress_tokens or [])
        self.begin_suppress = list(g.begin_suppress_tokens or [])
        self.eos = g.eos_token_id
        # transformers renames the decoder cache argument (past_key_values -> cache, from 5.x)
        self.cache_arg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    def token_ids(self, wav: np.ndarray) -> list[int]:
        """The official call's tokens (prompt included) for 16 kHz samples."""
        import torch

        features = self.processor(wav, sampling_rate=JUDGE_RATE, return_tensors="pt").input_features
        with torch.no_grad():
            encoded = self.model.model.encoder(features.to(self.device, torch.float32)).last_hidden_state
            tokens, step, past = list(self.prompt), list(self.prompt), None
            while len(tokens) < self.max_length:
                out = self.model(
                    encoder_outputs=(encoded,),
                    decoder_input_ids=torch.tensor([step], device=self.device),
                    use_cache=True,
                    **{self.cache_arg: past},
                )
                logits = out.logits[0, -1].float()
                logits[self.suppress] = -float("inf")
                if len(tokens) == len(self.prompt):
                    logits[self.begin_suppress] = -float("inf")
                token = int(logits.argmax())
                tokens.append(token)
                if token == self.eos:
                    break
                step, past = [token], getattr(out, "cache", None) or out.past_key_values
        return tokens

    def transcribe_window(self, wav: np.ndarray, language: str = "en", beam_size: int | None = None) -> str:
        """The official English transcript of 16 kHz samples (English only; greedy, as the official call)."""
        if language != "en" or beam_size:
            raise ValueError("the official transformers Whisper call is greedy English transcription")
        return self.processor.batch_decode([self.token_ids(wav)], skip_special_tokens=True)[0]


class FasterWhisperASR:
    """F5-TTS's English ASR (``f5_tts/eval/utils_eval.py``): faster-whisper (CTranslate2) from a local folder
    (large-v3 converted), float16 on a GPU as F5 runs it, float32 on a CPU; each file transcribed with
    ``beam_size=5, language="en"`` and faster-whisper's other defaults (temperature fallback, no VAD
    filter); the transcript is every segment's text, each after a space, as F5 joins them. The temperature
    fallback samples; CTranslate2's generator is seeded (0) before each file, so a rerun gives the same
    transcript."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        try:
            from faster_whisper import WhisperModel
        except ImportError as error:
            raise ValueError(
                "the f5 profile's ASR needs faster-whisper: pip install faster-whisper"
            ) from error
        kind, _, index = device.partition(":")
        self.model = WhisperModel(
            str(folder),
            device=kind,
            device_index=int(index or 0),
            compute_type="float16" if kind == "cuda" else "float32",
        )

    def transcribe_files(self, paths: list[str | Path]) -> list[str]:
        """F5-TTS's transcript of each file (faster-whisper reads and resamples it itself)."""
        import ctranslate2

        out = []
        for path in paths:
            ctranslate2.set_random_seed(0)
            segments, _ = self.model.transcribe(str(path), beam_size=5, language="en")
            hypothesis = ""
            for segment in segments:
                hypothesis = hypothesis + " " + segment.text
            out.append(hypothesis)
        return out


class ParaformerASR:
    """Paraformer-zh through funasr (the ``zh`` extra), from a local model folder, with no VAD and no
    punctuation model, as Seed-TTS-Eval runs it."""

    languages = ("zh", "cmn")

    def __init__(self, cfg: ASRConfig, device: str = "cpu"):
        check_paths(cfg)
        try:
            from funasr import AutoModel
        except ImportError as error:
            raise ValueError("Paraformer needs funasr: pip install 's2train[zh]'") from error
        self.model = AutoModel(
            model=str(cfg.paraformer), device=device, disable_update=True, disable_pbar=True
        )

    def __call__(self, wavs: list[np.ndarray], langs: list[str | None]) -> list[Transcript]:
        return per_language(wavs, langs, self.languages, self._one)

    def _one(self, wav: np.ndarray, lang: str) -> Transcript:
        audio = np.ascontiguousarray(wav, dtype=np.float32)
        return Transcript(text=self.model.generate(input=audio, batch_size_s=300)[0]["text"], lang=lang)

    def transcribe_files(self, paths: list[str | Path]) -> list[str]:
        """Seed-TTS-Eval's decoding: funasr reads each file itself; returns the texts as decoded."""
        return [self.model.generate(input=str(p), batch_size_s=300)[0]["text"] for p in paths]


def build_asr(
    cfg: ASRConfig, device: str = "cpu"
) -> PocketSphinxASR | WhisperASR | TransformersWhisperASR | FasterWhisperASR | ParaformerASR:
    if cfg.backend == "whisper":
        return WhisperASR(cfg, device)
    if cfg.backend == "whisper_hf":
        check_paths(cfg)
        return TransformersWhisperASR(cfg.whisper_hf, device)
    if cfg.backend == "faster_whisper":
        check_paths(cfg)
        return FasterWhisperASR(cfg.faster_whisper, device)
    if cfg.backend == "paraformer":
        return ParaformerASR(cfg, device)
    return PocketSphinxASR(cfg)


# ------------------------------------------------------------------------------------------- filters


def _tokens(text: str) -> list[str]:
    """Words, or characters for scripts written without spaces (Chinese, Japanese)."""
    text = text.lower()
    if re.search(r"[\u3040-\u30ff\u3400-\u9fff]", text):
        return [c for c in text if not c.isspace() and c.isalnum()]
    return re.findall(r"[\w']+", text)


def max_ngram_repeat(tokens: list[str], max_n: int = 4) -> int:
    """The largest number of back-to-back repeats of any n-gram, n = 1..max_n."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for start in range(n):
            run, prev = 1, None
            for i in range(start, len(tokens) - n + 1, n):
                gram = tuple(tokens[i : i + n])
                run = run + 1 if gram == prev else 1
                prev = gram
                best = max(best, run)
    return best


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def transcript_checks(t: Transcript, cfg: ASRConfig) -> tuple[str | None, dict]:
    """``(reject reason or None, the values that decided it)`` for one transcript."""
    tokens = _tokens(t.text)
    values = {
        "words": len(tokens),
        "max_ngram_repeat": max_ngram_repeat(tokens),
        "unique_word_ratio": round(len(set(tokens)) / len(tokens), 4) if tokens else 0.0,
        "compression_ratio": round(compression_ratio(t.text), 4),
        "avg_logprob": None if t.avg_logprob is None else round(t.avg_logprob, 4),
        "lang": t.lang,
        "lang_prob": t.lang_prob,
    }
    if not t.supported:
        return None, values  # nothing to judge: kept as audio-only material
    lowered = t.text.lower()
    if cfg.languages and t.lang not in cfg.languages:
        return "language", values
    if not tokens:
        return "empty_transcript", values
    if values["max_ngram_repeat"] > cfg.max_ngram_repeats:
        return "repeated_ngram", values
    if len(tokens) >= 8 and values["unique_word_ratio"] < cfg.min_unique_word_ratio:
        return "low_unique_word_ratio", values
    phantom = next((p for p in cfg.phantom_phrases if p.lower() in lowered), None)
    if phantom:
        values["phantom_phrase"] = phantom
        return "phantom_phrase", values
    if values["compression_ratio"] > cfg.max_compression_ratio:
        return "high_compression_ratio", values
    if t.avg_logprob is not None and t.avg_logprob < cfg.min_avg_logprob:
        return "low_avg_logprob", values
    return None, values
