"""``stage=demo_corpus``: a small, deterministic, multi-speaker, multilingual corpus made on this machine.

Speech is synthesised with Debian's ``flite`` (English voices awb, rms, slt, kal) and ``espeak-ng``
(Mandarin ``cmn`` and Spanish ``es``) from the sentence lists in ``data_pipeline/sentences/``. Each
"recording" (20-60 s) strings several sentences together with pauses, over a faint noise floor.
Deliberately bad material sits beside the good, each labelled in ``truth.jsonl`` with the rejection it
must get from ``stage=clean``, plus two awkward but good files (another sample rate, stereo) that must
be kept after conversion, one recording of two voices one after the other (kept as two voices) and one
where two voices overlap for 5 s (the overlap rejected, the solo stretches kept).

Outputs under ``<run_dir>/corpus/``: the audio, ``metadata.jsonl`` (audiofolder style: file name,
language, speaker, as a real dataset would ship them), ``truth.jsonl`` (every sentence with its text,
language, speaker, start and end; the expected verdict of each file) and ``quality_calibration.json``
(the DNSMOS threshold the demo's clean stage uses: synthetic voices score below real speech).

    python -m s2train stage=demo_corpus
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from s2train.audio import resample
from s2train.checks import check
from s2train.judges import JUDGE_RATE
from s2train.runs import atomic_path, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from s2train.config import S2Config


@dataclass
class DemoCorpusConfig:
    sample_rate: int = 16000
    recordings_per_voice: int = 1
    min_recording_s: float = 20.0
    max_recording_s: float = 40.0
    long_recording_s: float = 45.0  # one recording longer than max_segment_s, to exercise splitting
    calibrate: bool = True  # measure DNSMOS on the good recordings and write a demo threshold
    # One file per sentence for the demo's speech model: every English sentence in each of these voices,
    # at the speaking rates of sentence_stretches in turn (> 1 slower), its transcript in the metadata.
    sentence_voices: list[str] = field(default_factory=list)
    sentence_stretches: list[float] = field(default_factory=lambda: [1.0])
    # Each sentence also spoken at each of these rates by one voice, the voices in turn: the same voice
    # and words at several paces, which only the caption's pace tells apart; [] for none.
    sentence_paces: list[float] = field(default_factory=list)
    sentence_pause_every: int = 0  # every n-th sentence file gets a pause of 0.7-1.4 s at its comma; 0: none
    # every n-th sentence file (of those without a pause) stresses one word: the rest is spoken 9 dB
    # quieter, so the captioner's [emphasis] finds it; 0: none
    sentence_emphasis_every: int = 0
    sentences_per_voice: int = 40  # the first this many English sentences (there are 40)

    def __post_init__(self) -> None:
        check(
            20.0 <= self.min_recording_s <= self.max_recording_s <= 60.0,
            "demo_corpus recordings must be 20-60 s long",
        )
        unknown = [v for v in self.sentence_voices if v not in VOICES or VOICES[v][2] != "en"]
        check(not unknown, f"demo_corpus.sentence_voices must be English demo voices, not {unknown}")
        check(
            bool(self.sentence_stretches) and all(0.4 <= x <= 2.5 for x in self.sentence_stretches),
            "demo_corpus.sentence_stretches must be speaking-rate factors in [0.4, 2.5]",
        )
        check(
            all(0.4 <= x <= 2.5 and x != 1.0 for x in self.sentence_paces),
            "demo_corpus.sentence_paces must be speaking-rate factors in [0.4, 2.5] other than 1.0",
        )


SENTENCES = Path(__file__).parent / "sentences"
CORPUS_VERSION = 4  # 2: a recording of two voices in turn; the overlap recording keeps its solo parts;
# 3: sentence files may stress a word; 4: a voice may say a sentence again at other paces
EMPHASIS_QUIET_DB = -9.0  # the level of the rest of a sentence with a stressed word
NOISE_FLOOR = 3e-4  # about -70 dBFS of white noise under everything
# speaker id -> (engine, engine voice, language)
VOICES = {
    "awb": ("flite", "awb", "en"),
    "rms": ("flite", "rms", "en"),
    "slt": ("flite", "slt", "en"),
    "kal": ("flite", "kal16", "en"),
    "cmn": ("espeak-ng", "cmn", "cmn"),
    "es": ("espeak-ng", "es", "es"),
}


# Voices the demo's models never hear in training: the fine-tuning demo learns one of them from a folder
FINETUNE_VOICES = {"ked": ("festival", "ked_diphone", "en")}  # festival's American English male diphones
# The sentences the demo model learnt in other voices (demo_corpus.sentences_per_voice in experiment=demo):
# a model of 96 sentence files speaks those, not English, so the new voice says them too
FINETUNE_SENTENCES = 16
FINETUNE_STRETCHES = (1.0, 0.85, 1.2)  # each sentence three times, at three speaking rates
FINETUNE_HELDOUT = 6  # the first sentences once only, held out of fine-tuning


def sentences(lang: str) -> list[str]:
    return [
        s.strip() for s in (SENTENCES / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if s.strip()
    ]


def stressed_word(words: list[str]) -> int:
    """The word a sentence file stresses: the longest in the middle half (ties: the first)."""
    middle = range(len(words) // 4, max(len(words) // 4 + 1, 3 * len(words) // 4))
    return max(middle, key=lambda i: (len(words[i].strip(",.?!")), -i))


def check_tools() -> None:
    missing = [tool for tool in ("flite", "espeak-ng") if shutil.which(tool) is None]
    if missing:
        raise ValueError(f"the demo corpus needs {' and '.join(missing)}: apt-get install flite espeak-ng")


def synthesize(speaker: str, text: str, sample_rate: int, stretch: float = 1.0) -> np.ndarray:
    """One sentence from the speaker's engine, mono float32 at ``sample_rate``; ``stretch`` > 1 speaks
    slower (flite's duration_stretch, espeak-ng's words per minute)."""
    engine, voice, _ = VOICES[speaker] if speaker in VOICES else FINETUNE_VOICES[speaker]
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        if engine == "festival":
            (Path(tmp) / "s.txt").write_text(text, encoding="utf-8")
            setup = f"(begin (voice_{voice}) (Parameter.set 'Duration_Stretch {stretch}))"
            cmd = ["text2wave", "-eval", setup, str(Path(tmp) / "s.txt"), "-o", str(wav)]
        elif engine == "flite":
            cmd = [
                "flite",
                "-voice",
                voice,
                "--setf",
                f"duration_stretch={stretch}",
                "-t",
                text,
                "-o",
                str(wav),
            ]
        else:
            cmd = ["espeak-ng", "-v", voice, "-s", str(round(175 / stretch)), "-w", str(wav), text]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        samples, rate = sf.read(wav, dtype="float32", always_2d=True)
    samples = resample(samples[:, 0], rate, sample_rate)
    return 0.5 * samples / max(float(np.abs(samples).max()), 1e-6)  # level voices alike, -6 dBFS peaks


class Builder:
    def __init__(self, cfg: S2Config, out: Path):
        self.cfg, self.out, self.sr = cfg, out, cfg.demo_corpus.sample_rate
        self.rng = np.random.default_rng(cfg.seed)
        self.next_sentence: dict[str, int] = {}
        self.truth: list[dict] = []
        self.metadata: list[dict] = []

    def take(self, speaker: str) -> str:
        lang = VOICES[speaker][2]
        pool = sentences(lang)
        offset = [s for s in VOICES if VOICES[s][2] == lang].index(
            speaker
        ) * 10  # voices of a language differ
        i = self.next_sentence.get(speaker, offset)
        self.next_sentence[speaker] = i + 1
        return pool[i % len(pool)]

    def speech(self, speaker: str, target_s: float, pause=(0.35, 0.9)) -> tuple[np.ndarray, list[dict]]:
        """Sentences of one speaker with pauses until ``target_s``; returns audio and sentence times."""
        lead = np.zeros(int(0.5 * self.sr), np.float32)
        parts, rows, t = [lead], [], len(lead) / self.sr
        while t < target_s - 0.5:
            text = self.take(speaker)
            audio = synthesize(speaker, text, self.sr)
            rows.append(
                {
                    "text": text,
                    "lang": VOICES[speaker][2],
                    "speaker": speaker,
                    "start": round(t, 3),
                    "end": round(t + len(audio) / self.sr, 3),
                }
            )
            gap = np.zeros(int(self.rng.uniform(*pause) * self.sr), np.float32)
            parts += [audio, gap]
            t += (len(audio) + len(gap)) / self.sr
        parts.append(lead)
        return np.concatenate(parts), rows

    def noise(self, n: int, level: float = NOISE_FLOOR) -> np.ndarray:
        return (self.rng.standard_normal(n) * level).astype(np.float32)

    def write(
        self,
        name: str,
        audio: np.ndarray,
        rate: int,
        *,
        kind: str,
        sentences_: list[dict],
        expected: dict | None = None,
        lang: str | None = None,
        speaker: str | None = None,
        note: str = "",
    ) -> None:
        path = self.out / name
        with atomic_path(path) as tmp:
            sf.write(tmp, audio, rate, format="WAV", subtype="PCM_16")
        channels = 1 if audio.ndim == 1 else audio.shape[1]
        self.truth.append(
            {
                "file": name,
                "kind": kind,
                "expected": expected,
                "sample_rate": rate,
                "channels": channels,
                "duration": round(len(audio) / rate, 3),
                "lang": lang,
                "speaker": speaker,
                "note": note,
                "sentences": sentences_,
            }
        )
        if lang:
            self.metadata.append(
                {"file_name": name, "lang": lang, **({"speaker": speaker} if speaker else {})}
            )

    def good(self, speaker: str, index: int, target_s: float) -> None:
        audio, rows = self.speech(speaker, target_s)
        self.write(
            f"{speaker}_{index:02d}.wav",
            audio + self.noise(len(audio)),
            self.sr,
            kind="good",
            sentences_=rows,
            lang=VOICES[speaker][2],
            speaker=speaker,
        )

    def sentence_files(self) -> None:
        """One sentence a file for each of ``sentence_voices``, at the rates of ``sentence_stretches`` in
        turn, some with a pause at a comma (``paced_sentence_files`` adds the other paces). The transcript
        goes in the metadata (ASR need not guess it)."""
        c = self.cfg.demo_corpus
        for v, voice in enumerate(c.sentence_voices):
            for i, text in enumerate(sentences("en")[: c.sentences_per_voice]):
                stretch = c.sentence_stretches[(i + v) % len(c.sentence_stretches)]
                paused = c.sentence_pause_every and (i + v) % c.sentence_pause_every == 0 and "," in text
                stressed = (
                    not paused and c.sentence_emphasis_every and (i + v) % c.sentence_emphasis_every == 1
                )
                self.sentence_file(f"sent_{voice}_{i:02d}.wav", voice, text, stretch, paused, stressed)

    def paced_sentence_files(self) -> None:
        """Each sentence again at each of ``sentence_paces`` in one voice, the voices in turn (made last,
        so that the random draws of everything else are those of a corpus without them)."""
        c = self.cfg.demo_corpus
        for i, text in enumerate(sentences("en")[: c.sentences_per_voice]):
            voice = c.sentence_voices[i % len(c.sentence_voices)] if c.sentence_voices else None
            for pace in c.sentence_paces if voice else ():
                self.sentence_file(f"sent_{voice}_{i:02d}_x{pace:g}.wav", voice, text, pace, False, False)

    def sentence_file(
        self, name: str, voice: str, text: str, stretch: float, paused: bool, stressed: bool
    ) -> None:
        """One sentence in ``voice`` at ``stretch``, with a pause at its comma or one word stressed."""
        lead = np.zeros(int(0.3 * self.sr), np.float32)
        emphasis = None
        if paused:
            first, second = text.split(",", 1)
            gap = np.zeros(int(self.rng.uniform(0.7, 1.4) * self.sr), np.float32)
            pieces = [
                synthesize(voice, first + ",", self.sr, stretch),
                gap,
                synthesize(voice, second.strip(), self.sr, stretch),
            ]
            speech = np.concatenate(pieces)
        elif stressed:
            words = text.split()
            k = stressed_word(words)
            quiet = 10 ** (EMPHASIS_QUIET_DB / 20)
            pieces = [
                quiet * synthesize(voice, " ".join(words[:k]), self.sr, stretch),
                synthesize(voice, words[k], self.sr, stretch),
                quiet * synthesize(voice, " ".join(words[k + 1 :]), self.sr, stretch),
            ]
            speech = np.concatenate(pieces)
            emphasis = words[k]
        else:
            speech = synthesize(voice, text, self.sr, stretch)
        audio = np.concatenate([lead, speech, lead])
        row = {
            "text": text,
            "lang": "en",
            "speaker": voice,
            "start": 0.3,
            "end": round(0.3 + len(speech) / self.sr, 3),
            "stretch": stretch,
            "pause": bool(paused),
            "emphasis": emphasis,
        }
        self.write(
            name,
            audio + self.noise(len(audio)),
            self.sr,
            kind="sentence",
            sentences_=[row],
            lang="en",
            speaker=voice,
        )
        self.metadata[-1]["text"] = text

    def build(self) -> None:
        c = self.cfg.demo_corpus
        self.sentence_files()
        for speaker in VOICES:
            for index in range(c.recordings_per_voice):
                self.good(speaker, index, self.rng.uniform(c.min_recording_s, c.max_recording_s))
        # longer than a segment may be: the clean stage must split it at its longest pause
        audio, rows = self.speech("awb", c.long_recording_s)
        self.write(
            "awb_long.wav",
            audio + self.noise(len(audio)),
            self.sr,
            kind="good",
            sentences_=rows,
            lang="en",
            speaker="awb",
            note="longer than judges.vad.max_segment_s: split at a pause",
        )

        # good but awkward: another sample rate, and stereo; both must be kept after conversion
        audio, rows = self.speech("rms", c.min_recording_s)
        audio = resample(audio + self.noise(len(audio)), self.sr, 44100)
        self.write(
            "rms_44k.wav",
            audio,
            44100,
            kind="good",
            sentences_=rows,
            lang="en",
            speaker="rms",
            note="44.1 kHz: resampled on the way in",
        )
        audio, rows = self.speech("slt", c.min_recording_s)
        stereo = np.stack([audio + self.noise(len(audio)), 0.8 * audio + self.noise(len(audio))], axis=1)
        self.write(
            "slt_stereo.wav",
            stereo,
            self.sr,
            kind="good",
            sentences_=rows,
            lang="en",
            speaker="slt",
            note="stereo: mixed down on the way in",
        )

        # bad material, each with the verdict it must get
        audio, rows = self.speech("rms", c.min_recording_s)
        speech_rms = float(np.sqrt(np.mean(audio[np.abs(audio) > 0.01] ** 2)))
        self.write(
            "bad_noisy.wav",
            audio + self.noise(len(audio), speech_rms),
            self.sr,
            kind="bad",
            sentences_=rows,
            lang="en",
            expected={"stage": "quality", "reason": "low_snr"},
            note="white noise at 0 dB SNR",
        )
        audio, rows = self.speech("slt", c.min_recording_s)
        self.write(
            "bad_clipped.wav",
            np.clip(audio * 8.0, -1.0, 1.0) + 0.0,
            self.sr,
            kind="bad",
            sentences_=rows,
            lang="en",
            expected={"stage": "quality", "reason": "clipping"},
            note="amplified 18 dB into hard clipping",
        )
        self.write(
            "bad_silence.wav",
            self.noise(int(c.min_recording_s * self.sr)),
            self.sr,
            kind="bad",
            sentences_=[],
            expected={"stage": "vad", "reason": "no_speech"},
            note="noise floor only",
        )
        t = np.arange(int(c.min_recording_s * self.sr)) / self.sr
        tone = 0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.1 * np.sin(2 * np.pi * 880.0 * t)
        self.write(
            "bad_tone.wav",
            tone.astype(np.float32),
            self.sr,
            kind="bad",
            sentences_=[],
            expected={"stage": "vad", "reason": "no_speech"},
            note="440 Hz tone with one harmonic",
        )
        self.overlap()
        self.two_voices()
        corrupt = b"RIFF\x24\x08\x00\x00WAVEfmt " + self.rng.bytes(3000)
        with atomic_path(self.out / "bad_corrupt.wav") as tmp:
            tmp.write_bytes(corrupt)
        self.truth.append(
            {
                "file": "bad_corrupt.wav",
                "kind": "bad",
                "sentences": [],
                "note": "a broken header",
                "expected": {"stage": "decode", "reason": "unreadable"},
            }
        )
        self.paced_sentence_files()

    def overlap(self) -> None:
        """awb, then slt starting 5 s before awb stops: the 5 s of both at once must be rejected as
        overlapped speech, the stretches of one voice either side may be kept."""
        a, rows_a = self.speech("awb", 12.0)
        b, rows_b = self.speech("slt", 12.0)
        shift = len(a) - int(5.0 * self.sr)
        mix = np.zeros(shift + len(b), np.float32)
        mix[: len(a)] += a
        mix[shift:] += b
        _shift(rows_b, shift / self.sr)
        self.write(
            "bad_overlap.wav",
            mix + self.noise(len(mix)),
            self.sr,
            kind="overlap",
            sentences_=rows_a + rows_b,
            lang="en",
            expected={"stage": "speaker", "reason": "overlapped_speech"},
            note="two voices, overlapping for 5 s",
        )
        self.truth[-1]["overlap"] = [rows_b[0]["start"], rows_a[-1]["end"]]

    def two_voices(self) -> None:
        """rms, a short pause, then slt: one VAD segment that must be split at the change of voice."""
        a, rows_a = self.speech("rms", 10.0)
        b, rows_b = self.speech("slt", 10.0)
        a, b = a[: int((rows_a[-1]["end"] + 0.3) * self.sr)], b[int(0.3 * self.sr) :]  # a 0.6 s pause
        _shift(rows_b, len(a) / self.sr - 0.3)
        both = np.concatenate([a, b])
        self.write(
            "two_voices.wav",
            both + self.noise(len(both)),
            self.sr,
            kind="two_voices",
            sentences_=rows_a + rows_b,
            lang="en",
            note="rms then slt after a 0.6 s pause: split at the change of voice, both kept",
        )


def _shift(rows: list[dict], seconds: float) -> None:
    """Move sentence times by ``seconds`` (their audio was placed later in a recording)."""
    for row in rows:
        row["start"], row["end"] = round(row["start"] + seconds, 3), round(row["end"] + seconds, 3)


def calibrate(out: Path, truth: list[dict], margin: float) -> dict:
    """DNSMOS OVRL of the good recordings and sentence files -> the demo's keep threshold (never above real
    data's 3.0)."""
    from s2train.judges.quality import DNSMOS_WINDOW_S, dnsmos_model

    model = dnsmos_model(0)
    measured = {}
    for row in truth:
        if row["kind"] in ("good", "sentence"):
            audio, rate = sf.read(out / row["file"], dtype="float32", always_2d=True)
            measured[row["file"]] = round(
                model(resample(audio.mean(axis=1), rate, JUDGE_RATE), DNSMOS_WINDOW_S)["ovrl"], 3
            )
    threshold = min(3.0, float(np.floor((min(measured.values()) - margin) * 100) / 100))
    return {
        "dnsmos_ovrl_min": threshold,
        "margin": margin,
        "measured_ovrl": measured,
        "rule": "min OVRL of the good demo recordings and sentence files minus the margin, at most 3.0",
    }


SEEDTTS_VOICES = ("awb", "rms", "slt")  # the prompts of the demo's Seed-TTS-Eval style set


def write_seedtts_set(out: Path, sample_rate: int) -> Path:
    """A small Seed-TTS-Eval meta list in ``out``: each flite voice speaks one training sentence as its
    prompt and two held-out sentences (``sentences/en_eval.txt``) as the ground truth of two utterances;
    lines are ``utt|prompt_text|prompt-wavs/<voice>.wav|target_text|wavs/<utt>.wav``. The same target
    texts and ground truth also make an EmergentTTS-Eval set in upstream's layout (``eval=emergent``):
    ``emergent/emergent_tts_eval_data.jsonl`` (category ``Demo sentences``) and ``baseline_audios/<i>.wav``."""
    meta = out / "meta.lst"
    targets = sentences("en_eval")
    prompts = sentences("en")
    inputs = json.dumps([targets, prompts, SEEDTTS_VOICES, sample_rate, "emergent"]).encode()
    stamp = hashlib.sha256(inputs).hexdigest()[:16]
    fingerprint = out / "fingerprint.txt"
    if meta.is_file() and fingerprint.is_file() and fingerprint.read_text() == stamp:
        return meta
    if out.exists():
        shutil.rmtree(out)
    (out / "prompt-wavs").mkdir(parents=True, exist_ok=True)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    lines = []
    for v, voice in enumerate(SEEDTTS_VOICES):
        prompt_text = prompts[v * 10]
        sf.write(
            out / "prompt-wavs" / f"{voice}.wav", synthesize(voice, prompt_text, sample_rate), sample_rate
        )
        for t in range(2):
            utt = f"{voice}-{t:02d}"
            target = targets[(2 * v + t) % len(targets)]
            sf.write(out / "wavs" / f"{utt}.wav", synthesize(voice, target, sample_rate), sample_rate)
            lines.append(f"{utt}|{prompt_text}|prompt-wavs/{voice}.wav|{target}|wavs/{utt}.wav")
    (out / "emergent" / "baseline_audios").mkdir(parents=True)
    rows = []
    for i, line in enumerate(lines):
        utt, _, _, target, gt = line.split("|")
        shutil.copyfile(out / gt, out / "emergent" / "baseline_audios" / f"{i}.wav")
        rows.append(
            {"category": "Demo sentences", "text_to_synthesize": target, "evolution_depth": 0, "utt": utt}
        )
    write_text_atomic(
        out / "emergent" / "emergent_tts_eval_data.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    write_text_atomic(fingerprint, stamp)
    write_text_atomic(meta, "\n".join(lines) + "\n")  # last: its presence means the set is whole
    return meta


def write_voice_folder(out: Path, sample_rate: int, voice: str = "ked") -> Path:
    """A folder of one voice the demo never trains on, as a user brings one to ``stage=finetune``: the
    first ``FINETUNE_SENTENCES`` English sentences as ``<voice>-sNN-rK.wav`` (K: the speaking rate of
    ``FINETUNE_STRETCHES``; the first ``FINETUNE_HELDOUT`` sentences at the normal rate only) with the
    transcript in ``.txt`` beside each (one ``.lab``; the last file has none: the ASR judge writes it), and
    two files no one can train on: ``broken.wav`` (not audio) and ``silence.wav`` (no speech)."""
    if shutil.which("text2wave") is None:
        raise ValueError(
            "the demo's fine-tuning voice needs festival: apt-get install festival festvox-kdlpc16k"
        )
    texts = sentences("en")[:FINETUNE_SENTENCES]
    stamp = hashlib.sha256(
        json.dumps([texts, voice, FINETUNE_STRETCHES, FINETUNE_HELDOUT, sample_rate]).encode()
    )
    fingerprint = out / "fingerprint.txt"
    if fingerprint.is_file() and fingerprint.read_text() == stamp.hexdigest()[:16]:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = [
        (i, k, stretch)
        for i in range(len(texts))
        for k, stretch in enumerate(FINETUNE_STRETCHES)
        if i >= FINETUNE_HELDOUT or k == 0
    ]
    rng = np.random.default_rng(7)
    for n, (i, k, stretch) in enumerate(files):
        name = f"{voice}-s{i:02d}-r{k}"
        audio = synthesize(voice, texts[i], sample_rate, stretch)
        audio = np.concatenate(
            [np.zeros(sample_rate // 4, np.float32), audio, np.zeros(sample_rate // 4, np.float32)]
        )
        sf.write(
            out / f"{name}.wav",
            audio + (rng.standard_normal(len(audio)) * NOISE_FLOOR).astype(np.float32),
            sample_rate,
        )
        if n < len(files) - 1:  # .lab (a forced aligner's name for it) for one of them
            suffix = ".lab" if n == len(files) - 2 else ".txt"
            (out / f"{name}{suffix}").write_text(texts[i] + "\n", encoding="utf-8")
    (out / "broken.wav").write_bytes(b"RIFF, but no audio: a file that did not finish copying\n")
    sf.write(
        out / "silence.wav",
        (rng.standard_normal(3 * sample_rate) * NOISE_FLOOR).astype(np.float32),
        sample_rate,
    )
    write_text_atomic(fingerprint, stamp.hexdigest()[:16])  # last: the folder is whole
    return out


def run(cfg: S2Config) -> dict:
    check_tools()
    out = Path(cfg.run_dir) / "corpus"
    fingerprint = hashlib.sha256(
        json.dumps([CORPUS_VERSION, asdict(cfg.demo_corpus), cfg.seed, sorted(VOICES.items())]).encode()
        + b"".join(p.read_bytes() for p in sorted(SENTENCES.glob("*.txt")))
    ).hexdigest()[:16]
    done = out / "truth.jsonl"
    stamp = out / "fingerprint.txt"
    if not (done.exists() and stamp.exists() and stamp.read_text() == fingerprint):
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        builder = Builder(cfg, out)
        builder.build()
        write_text_atomic(
            out / "metadata.jsonl",
            "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in builder.metadata),
        )
        if cfg.demo_corpus.calibrate:
            write_json_atomic(out / "quality_calibration.json", calibrate(out, builder.truth, margin=0.2))
        write_text_atomic(stamp, fingerprint)
        write_text_atomic(
            done, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in builder.truth)
        )  # last
    truth = [json.loads(line) for line in done.read_text(encoding="utf-8").splitlines()]
    calibration = (
        json.loads((out / "quality_calibration.json").read_text()) if cfg.demo_corpus.calibrate else {}
    )
    seedtts_meta = write_seedtts_set(Path(cfg.run_dir) / "seedtts", cfg.demo_corpus.sample_rate)
    voice = write_voice_folder(Path(cfg.run_dir) / "voice", cfg.demo_corpus.sample_rate)
    return {
        "corpus": str(out),
        "seedtts_meta": str(seedtts_meta),
        "finetune_voice": str(voice),
        "recordings": len(truth),
        "good": sum(t["kind"] == "good" for t in truth),
        "bad": sum(t["kind"] == "bad" for t in truth),
        "two_voice": sum(t["kind"] in ("overlap", "two_voices") for t in truth),
        "sentences": sum(len(t["sentences"]) for t in truth),
        "minutes": round(sum(t.get("duration", 0.0) for t in truth) / 60, 2),
        "speakers": len(VOICES),
        "dnsmos_ovrl_min": calibration.get("dnsmos_ovrl_min"),
    }
