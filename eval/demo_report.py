"""``stage=demo_report``: does the demo's model speak? Figures of the demo's trained model on its own corpus.

Read with ``runs/<name>/demo_corpus`` (its one-sentence files, ``demo_corpus.sentence_voices``) and the
model and codec the demo trained (``demo_report.model``: default the SFT run, ``synthesize.codec`` or
``tokenize.codec``). Every utterance clones a voice of the corpus from another of its sentence files,
through the synthesis call the server and evaluation share, and is scored by the offline judges
(pocketsphinx, a fresh decoder each; resemblyzer; the captioner's speaking rate):

- **seen**: sentences the model trained on, each in every voice, beside the WER of the same files passed
  through the codec (encode + decode of the codebooks the model makes: the ceiling a model of these codes
  can reach; and of all the codec's codebooks) and of the files;
- **seen, plain**: the same sentences without a reference clip (the model speaks in a voice of its own
  choosing, as in the plain training examples), ``demo_report.plain_seeds`` seeds each; beside the
  ceiling of all four voices' files, that of the file in the voice each utterance was heard in (the
  closest voice by resemblyzer): pocketsphinx hears the voices' files of one sentence very differently,
  so which voice the model chose moves the plain WER by more than how well it spoke;
- **held-out**: the Seed-TTS-style sentences of ``sentences/en_eval.txt``, never trained on;
- **cloning**: the mean similarity of each voice's generated speech to that voice's recordings, against
  the mean to the other voices';
- **captions**: the same texts asked for a slow and for a fast pace (no reference clip: the caption is
  the whole description, as in the captioned training examples), over several seeds: the speaking rate
  (syllables per second of speech) of each. A text asks in the captions the captioner wrote for its
  recordings at other paces (``demo_corpus.sentence_paces``), each caption at both paces, so that the
  two prompts of a pair differ in the pace word alone; texts with such captions are taken first.

Outputs: ``results.json``, ``utterances.jsonl`` and ``report.md`` in the run directory, and the audio
under ``wav/``.

    python -m s2train experiment=demo stage=demo_report
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

from data_pipeline.demo_corpus import sentences
from s2train.audio import resample
from s2train.checks import check
from s2train.inference.synthesis import Synthesizer, Utterance, read_reference
from s2train.judges import JUDGE_RATE
from s2train.judges.captioner import count_syllables
from s2train.judges.suite import JudgeSuite
from s2train.judges.wer import normalize, wer
from s2train.runs import stage_input, write_json_atomic, write_text_atomic
from s2train.stats import bootstrap_interval

if TYPE_CHECKING:
    from s2train.config import S2Config


PACES = ("slow", "fast")  # the pace words of the caption test
PACE_PHRASE = re.compile(r"\b(slow|moderate|fast) (pace|delivery)")  # a caption that names a pace
PACE_WORD = re.compile(r"\b(slow|moderate|fast)\b")


@dataclass
class DemoReportConfig:
    model: str | None = None  # None: run_root/name/sft
    seen: int = 10  # training sentences, each spoken in every voice
    heldout: int = 6  # sentences of en_eval.txt, each in every voice
    caption_texts: int = 4  # texts spoken with a slow and a fast caption ...
    caption_seeds: int = 3  # ... with this many seeds each
    plain_seeds: int = 2  # the seen sentences also spoken without a reference, with this many seeds
    max_new_tokens: int = 400
    rate_caption: str | None = None  # the caption of the pace test, {pace} where "slow" / "fast" goes;
    # None: a caption the captioner wrote for the first voice, its pace word replaced

    def __post_init__(self) -> None:
        for name in ("seen", "heldout", "caption_texts", "caption_seeds", "plain_seeds", "max_new_tokens"):
            check(getattr(self, name) >= 1, f"demo_report.{name} must be at least 1")
        check(
            self.rate_caption is None or "{pace}" in self.rate_caption,
            f"demo_report.rate_caption must say where the pace goes with {{pace}}, not {self.rate_caption!r}",
        )


def _read(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    return resample(audio.mean(axis=1), rate, JUDGE_RATE)


def _speech_seconds(judges: JudgeSuite, wav: np.ndarray) -> float:
    regions = judges.vad([wav])[0]
    return float(sum(b - a for a, b in regions))


def run(cfg: S2Config) -> dict:
    r = cfg.demo_report
    run_dir = Path(cfg.run_dir)
    corpus = stage_input(cfg, "demo_corpus") / "corpus"
    truth = [json.loads(line) for line in (corpus / "truth.jsonl").read_text(encoding="utf-8").splitlines()]
    files = [
        t
        for t in truth
        if t["kind"] == "sentence" and t["sentences"][0]["stretch"] == 1.0 and not t["sentences"][0]["pause"]
    ]
    if not files:
        raise ValueError(
            f"{corpus} has no one-sentence files at the normal rate: set demo_corpus.sentence_voices "
            "(experiment=demo does)"
        )
    voices = sorted({t["speaker"] for t in files})
    everything = [t for t in truth if t["kind"] == "sentence"]
    # references: the voice's plain files first, then its other files (another rate, a pause)
    by_voice = {v: [t for t in files + everything if t["speaker"] == v] for v in voices}
    model = stage_input(cfg, "sft", r.model)
    codec_path = cfg.synthesize.codec or cfg.tokenize.codec
    synth = Synthesizer.open(cfg.synthesize, cfg.text, model, codec_path)
    judges = JudgeSuite(cfg.judges, cfg.seed)
    wav_dir = run_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)

    texts_seen = sorted({t["sentences"][0]["text"] for t in files})[: r.seen]
    texts_heldout = sentences("en_eval")[: r.heldout]
    utterances, rows = [], {}

    def reference(voice: str, avoid: str) -> tuple[Path, str]:
        """A clip of ``voice`` that does not say ``avoid`` (the text to speak), if the corpus has one."""
        ref = next((t for t in by_voice[voice] if t["sentences"][0]["text"] != avoid), by_voice[voice][0])
        return (corpus / ref["file"]).resolve(), ref["sentences"][0]["text"]

    for group, texts in (("seen", texts_seen), ("heldout", texts_heldout)):
        for i, text in enumerate(texts):
            for voice in voices:
                clip, clip_text = reference(voice, text)
                uid = f"{group}-{voice}-{i:02d}"
                utterances.append(
                    Utterance(uid, text, clip, clip_text, seed=cfg.seed + i, max_new_tokens=r.max_new_tokens)
                )
                rows[uid] = {"id": uid, "group": group, "voice": voice, "text": text}
    for i, text in enumerate(texts_seen):  # no reference: the model speaks in a voice of its choosing
        for s in range(r.plain_seeds):
            uid = f"plain-{i:02d}-{s}"
            utterances.append(Utterance(uid, text, seed=2000 + 10 * i + s, max_new_tokens=r.max_new_tokens))
            rows[uid] = {"id": uid, "group": "seen_plain", "voice": None, "text": text}
    # each text asks for a pace in the captions the captioner wrote for its recordings at other paces
    # (demo_corpus.sentence_paces), each caption at both paces; texts that have such captions come first
    paced: dict[str, tuple[str, list[str]]] = {}
    for t in everything:
        if t["sentences"][0]["stretch"] != 1.0:
            paced.setdefault(t["sentences"][0]["text"], (t["speaker"], []))[1].append(t["file"])
    asks, manifest = {}, _manifest_rows(cfg)
    for text in texts_seen:
        voice, twins = paced.get(text, (voices[0], []))
        asks[text] = {"voice": voice, **_pace_captions(cfg, voice, twins, manifest)}
    chosen = sorted(texts_seen, key=lambda text: not asks[text]["own"])[: r.caption_texts]
    captions = {text: asks[text] for text in chosen}
    for pace in PACES:
        for i, (text, asked) in enumerate(captions.items()):
            for b, base in enumerate(asked["captions"]):
                for s in range(r.caption_seeds):
                    uid = f"caption-{pace}-{i:02d}-{b}-{s}"
                    utterances.append(
                        Utterance(  # no reference clip: the caption alone says how to speak, as in training
                            uid,
                            text,
                            seed=1000 + 10 * i + s,
                            max_new_tokens=r.max_new_tokens,
                            caption=base[pace],
                        )
                    )
                    rows[uid] = {
                        "id": uid,
                        "group": f"caption_{pace}",
                        "voice": asked["voice"],
                        "text": text,
                        "caption": base[pace],
                    }

    heard = {}  # uid -> 16 kHz audio, transcribed together (judges.asr.workers at once)
    for spoken in synth.speak(utterances):
        uid = spoken.utterance.id
        sf.write(wav_dir / f"{uid}.wav", spoken.audio, synth.sample_rate)
        wav = heard[uid] = resample(spoken.audio, synth.sample_rate, JUDGE_RATE)
        row = rows[uid]
        row["seconds"] = round(len(wav) / JUDGE_RATE, 3)
        row["embedding"] = judges.embedder.embed([wav])[0] if len(wav) > JUDGE_RATE // 2 else None
        speech = _speech_seconds(judges, wav) if len(wav) else 0.0
        row["speaking_rate"] = round(count_syllables(row["text"]) / speech, 3) if speech > 0.3 else None
    for uid, transcript in zip(heard, judges.asr(list(heard.values()), ["en"] * len(heard))):
        rows[uid]["hyp"] = transcript.text

    # the files themselves and their codec reconstructions: the ground truth and the ceiling
    seen_files = [t for t in files if t["sentences"][0]["text"] in texts_seen]
    truth_rows, truth_wavs, codec = [], [], synth.codec
    device = next(codec.parameters()).device
    # the ceiling is the codec decoding the codebooks the model makes
    spoken = synth.model.config.num_codebooks
    for t in seen_files:
        wav = _read(corpus / t["file"])
        with torch.no_grad():  # the file through the codec, as a reference clip is encoded
            codes = read_reference(corpus / t["file"], codec).to(device)
            rebuilt = {
                k: resample(
                    codec.decode(codes[:k])[0, 0].float().cpu().numpy(), codec.config.sample_rate, JUDGE_RATE
                )
                for k in {spoken, codec.config.n_codebooks}
            }
        truth_rows.append(
            {
                "voice": t["speaker"],
                "text": t["sentences"][0]["text"],
                "embedding": judges.embedder.embed([wav])[0],
            }
        )
        truth_wavs += [wav, rebuilt[spoken], rebuilt[codec.config.n_codebooks]]
    transcripts = [x.text for x in judges.asr(truth_wavs, ["en"] * len(truth_wavs))]
    for i, row in enumerate(truth_rows):  # each file, then its reconstructions
        row["hyp_file"], row["hyp_codec"], row["hyp_codec_all"] = transcripts[3 * i : 3 * i + 3]

    def group_wer(group: str) -> float:
        chosen = [x for x in rows.values() if x["group"] == group]
        return round(100 * wer([x["text"] for x in chosen], [x["hyp"] for x in chosen]), 2)

    centroids = {
        v: _unit(np.mean([x["embedding"] for x in truth_rows if x["voice"] == v], axis=0)) for v in voices
    }
    own, others = [], []
    for x in rows.values():
        if x["group"] == "seen_plain" and x["embedding"] is not None:  # the voice it chose to speak in
            e = _unit(x["embedding"])
            x["heard_voice"] = max(voices, key=lambda v: float(e @ centroids[v]))
    for x in rows.values():
        if x["group"] != "seen" or x["embedding"] is None:
            continue
        e = _unit(x["embedding"])
        own.append(float(e @ centroids[x["voice"]]))
        others.extend(float(e @ centroids[v]) for v in voices if v != x["voice"])
    rates = {
        pace: [
            x["speaking_rate"]
            for x in rows.values()
            if x["group"] == f"caption_{pace}" and x["speaking_rate"]
        ]
        for pace in PACES
    }
    results = {
        "model": str(model),
        "voices": voices,
        "seen_sentences": len(texts_seen),
        "wer_seen": group_wer("seen"),
        "model_codebooks": spoken,
        "codec_codebooks": codec.config.n_codebooks,
        "wer_seen_codec": round(
            100 * wer([x["text"] for x in truth_rows], [x["hyp_codec"] for x in truth_rows]), 2
        ),
        "wer_seen_codec_all": round(
            100 * wer([x["text"] for x in truth_rows], [x["hyp_codec_all"] for x in truth_rows]), 2
        ),
        "wer_seen_files": round(
            100 * wer([x["text"] for x in truth_rows], [x["hyp_file"] for x in truth_rows]), 2
        ),
        "wer_seen_plain": group_wer("seen_plain"),
        "wer_heldout": group_wer("heldout"),
        "sim_own_voice": round(float(np.mean(own)), 4) if own else None,
        "sim_other_voices": round(float(np.mean(others)), 4) if others else None,
        "rate_slow_caption": round(float(np.mean(rates["slow"])), 3) if rates["slow"] else None,
        "rate_fast_caption": round(float(np.mean(rates["fast"])), 3) if rates["fast"] else None,
        "captions": captions,
    }
    # the ceiling of the recordings a plain prompt chose: the codec's WER of each sentence in the voice
    # the model spoke it in (its four voices' files are heard very differently by pocketsphinx)
    chosen = _chosen_ceiling(rows, truth_rows)
    results["wer_seen_codec_chosen_voice"] = (
        round(100 * wer([x["text"] for x in chosen], [x["hyp_codec"] for x in chosen]), 2) if chosen else None
    )
    results["wer_seen_above_codec"] = round(results["wer_seen"] - results["wer_seen_codec"], 2)
    results["wer_seen_plain_above_codec"] = round(results["wer_seen_plain"] - results["wer_seen_codec"], 2)
    # how far the figures would move with other sentences: intervals over the texts, each text's
    # utterances (seeds, voices, files) resampled together
    results["wer_seen_above_codec_ci95"] = _gap_interval(rows, "seen", truth_rows, texts_seen, cfg.seed)
    results["wer_seen_plain_above_codec_ci95"] = _gap_interval(
        rows, "seen_plain", truth_rows, texts_seen, cfg.seed
    )
    if chosen:
        results["wer_seen_plain_above_chosen"] = round(
            results["wer_seen_plain"] - results["wer_seen_codec_chosen_voice"], 2
        )
        results["wer_seen_plain_above_chosen_ci95"] = _gap_interval(
            rows, "seen_plain", truth_rows, texts_seen, cfg.seed, chosen_voice=True
        )
    paired = []  # per text: the mean rate under the slow caption minus that under the fast one
    for text in captions:
        slow, fast = (_rates(rows, f"caption_{pace}", text) for pace in PACES)
        if slow and fast:
            paired.append(np.mean(slow) - np.mean(fast))
    if paired:
        results["rate_slow_minus_fast"] = round(float(np.mean(paired)), 3)
        results["rate_slow_minus_fast_ci95"] = [
            round(x, 3) for x in bootstrap_interval(np.array(paired), cfg.seed)
        ]
        results["caption_texts_slower_when_asked"] = f"{sum(d < 0 for d in paired)} of {len(paired)}"
    write_text_atomic(
        run_dir / "utterances.jsonl",
        "".join(
            json.dumps({k: v for k, v in x.items() if k != "embedding"}, ensure_ascii=False) + "\n"
            for x in rows.values()
        ),
    )
    write_json_atomic(run_dir / "results.json", results)
    write_text_atomic(run_dir / "report.md", _report(results))
    return results


def _errors(reference: str, hypothesis: str) -> tuple[float, int]:
    """Word errors and reference words of one utterance (``wer``'s normaliser)."""
    words = len(normalize(reference).split())
    return (wer([reference], [hypothesis]) * words, words) if words else (0.0, 0)


def _chosen_ceiling(rows: dict, truth_rows: list[dict]) -> list[dict]:
    """The voice's file (its truth row) each plain utterance chose, in the order of ``rows``; empty when
    one of them has no voice (too short to embed)."""
    truth = {(x["voice"], x["text"]): x for x in truth_rows}
    plain = [x for x in rows.values() if x["group"] == "seen_plain"]
    if not all((x.get("heard_voice"), x["text"]) in truth for x in plain):
        return []
    return [truth[x["heard_voice"], x["text"]] for x in plain]


def _gap_interval(
    rows: dict, group: str, truth_rows: list[dict], texts: list[str], seed: int, chosen_voice: bool = False
) -> list[float]:
    """95% bootstrap interval over ``texts`` of the corpus WER of ``group`` minus the codec's (points): of
    the text's files in every voice, or with ``chosen_voice`` of the one file per utterance in the voice
    it was heard in."""
    counts = []
    for text in texts:
        mine = [x for x in rows.values() if x["group"] == group and x["text"] == text]
        spoken = [_errors(x["text"], x["hyp"]) for x in mine]
        files = [x for x in truth_rows if x["text"] == text]
        if chosen_voice:
            files = [next(t for t in files if t["voice"] == x["heard_voice"]) for x in mine]
        rebuilt = [_errors(x["text"], x["hyp_codec"]) for x in files]
        if spoken and rebuilt:
            counts.append([*np.sum(spoken, axis=0), *np.sum(rebuilt, axis=0)])
    if not counts:
        return []

    def gap(v: np.ndarray) -> np.ndarray:
        total = v.sum(axis=1)
        return 100 * (total[:, 0] / total[:, 1] - total[:, 2] / total[:, 3])

    return [round(x, 2) for x in bootstrap_interval(np.array(counts), seed, statistic=gap)]


def _rates(rows: dict, group: str, text: str) -> list[float]:
    return [
        x["speaking_rate"]
        for x in rows.values()
        if x["group"] == group and x["text"] == text and x["speaking_rate"]
    ]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _manifest_rows(cfg: S2Config) -> list[dict]:
    """The clean run's records (none without a clean run)."""
    manifest = stage_input(cfg, "clean") / "manifest.jsonl"
    if not manifest.is_file():
        return []
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


def _pace_captions(cfg: S2Config, voice: str, files: list[str] = (), rows: list[dict] | None = None) -> dict:
    """The captions a text's pace test asks with, each as a pair ``{"slow": ..., "fast": ...}`` that
    differ in the pace word alone: the captioner's captions of ``files`` (the text's recordings at other
    paces) that name a pace (``"own": True``), or else the first caption it wrote for ``voice`` naming one
    (a plain sentence of that form without a clean run); ``demo_report.rate_caption`` when it is set."""
    if cfg.demo_report.rate_caption:
        pair = {pace: cfg.demo_report.rate_caption.replace("{pace}", pace) for pace in PACES}
        return {"own": False, "captions": [pair]}
    rows = _manifest_rows(cfg) if rows is None else rows
    named = [row for row in rows if PACE_PHRASE.search(row.get("caption") or "")]
    own = [row["caption"] for row in named if row.get("source") in files]
    voiced = [row["caption"] for row in named if row.get("speaker") == voice]
    chosen = own or voiced[:1] or ["A speaker speaks at a moderate pace. A clean recording."]
    return {
        "own": bool(own),
        "captions": [{pace: PACE_WORD.sub(pace, caption, count=1) for pace in PACES} for caption in chosen],
    }


def _report(r: dict) -> str:
    lines = [
        "# Does the demo model speak?",
        "",
        f"Model: `{r['model']}`; voices {', '.join(r['voices'])}; pocketsphinx WER in %, resemblyzer similarity.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| WER, {r['seen_sentences']} seen sentences x {len(r['voices'])} voices (cloned) | {r['wer_seen']} |",
        f"| WER, the same sentences without a reference (the model picks a voice) | {r['wer_seen_plain']} |",
        f"| WER, the same sentences' files through the codec, the model's {r['model_codebooks']} codebooks (the ceiling) | {r['wer_seen_codec']} |",
        f"| ... of each plain utterance's sentence in the voice it chose (its ceiling) | {r.get('wer_seen_codec_chosen_voice')} |",
        f"| WER, the same through the codec, all its {r['codec_codebooks']} codebooks | {r['wer_seen_codec_all']} |",
        f"| WER, the files themselves | {r['wer_seen_files']} |",
        f"| WER, held-out sentences | {r['wer_heldout']} |",
        f"| SIM to the cloned voice / to the other voices | {r['sim_own_voice']} / {r['sim_other_voices']} |",
        f"| speaking rate (syllables/s) with a slow / a fast caption | {r['rate_slow_caption']} / {r['rate_fast_caption']} |",
        "",
        "Above the ceiling (WER points, 95% bootstrap interval over the sentences): cloned "
        f"{r['wer_seen_above_codec']} {_interval(r['wer_seen_above_codec_ci95'])}, without a reference "
        f"{r['wer_seen_plain_above_codec']} {_interval(r['wer_seen_plain_above_codec_ci95'])}",
    ]
    if "wer_seen_plain_above_chosen" in r:
        lines[-1] += (
            f", above the files of the voices it chose {r['wer_seen_plain_above_chosen']} "
            f"{_interval(r['wer_seen_plain_above_chosen_ci95'])}"
        )
    lines[-1] += "."
    if "rate_slow_minus_fast" in r:
        lines.append(
            f"Slow caption minus fast caption, per text: {r['rate_slow_minus_fast']} syllables/s "
            f"{_interval(r['rate_slow_minus_fast_ci95'])}; slower when asked for {r['caption_texts_slower_when_asked']} texts."
        )
    return "\n".join(lines) + "\n"


def _interval(ci: list[float]) -> str:
    return f"[{ci[0]}, {ci[1]}]" if ci else "(none)"
