"""``stage=clean``: raw recordings -> clean webdataset shards, with a reason for everything rejected.

Per recording: decode (any format soundfile reads; mono; soxr) -> silero VAD over the whole file in
bounded memory -> 3-30 s segments -> quality (clipping, SNR, bandwidth, DNSMOS) -> changes of voice
(a segment is split into one-voice parts at each change, snapped to a pause nearby; overlapped speech
is rejected) -> one-speaker check -> ASR and its hallucination filters -> captioner. A check that
fails rejects the segment with its stage, reason and the values that decided it; the checks after it
are not run.

Work is split into units of ``clean.files_per_shard`` input files. Unit ``u`` belongs to partition
``u % data.num_partitions`` (a SLURM array task takes one). A finished unit has written its shard
(``shards/shard-<u>.tar``, renamed into place) and then its marker (``units/<u>.json``, holding its
manifest rows, rejects and stats); a rerun skips units with a marker, so a killed run loses at most the
unit in flight and never leaves a half shard that looks done. ``manifest.jsonl``, ``rejects.jsonl`` and
``stats.json`` are rebuilt from the markers at the end of every run, in unit order.

    python -m s2train stage=clean data.path=/data/raw clean.sample_rate=44100
    sbatch --array=0-63 slurm/clean_array.sbatch data.path=/data/raw
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.shards import UnitLedger
from data_pipeline.sources import SourceItem, list_items
from s2train.audio import Excerpt, flac_bytes, read_excerpt, stream_mono
from s2train.checks import check
from s2train.judges import JUDGE_RATE
from s2train.judges.asr import transcript_checks
from s2train.judges.speaker import OVERLAP, Turn
from s2train.judges.suite import JudgeSuite
from s2train.judges.vad import Segment, plan_segments, speech_regions
from s2train.runs import atomic_path, write_json_atomic, write_text_atomic
from s2train.shards import write_tar

if TYPE_CHECKING:
    from s2train.config import S2Config


@dataclass
class CleanConfig:
    sample_rate: int = 44100  # of the audio in the clean shards
    files_per_shard: int = 16  # a unit of work: this many input files -> one shard + one marker
    block_s: float = 60.0  # decode this much at a time, so memory does not grow with file length
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.files_per_shard >= 1, "clean.files_per_shard must be at least 1")
        check(
            self.block_s > 0,
            f"clean.block_s (seconds decoded at a time) must be positive, not {self.block_s}",
        )
        check(self.sample_rate >= 8000, "clean.sample_rate must be at least 8000")


PIPELINE_VERSION = "clean-2"  # clean-2: segments split at changes of voice, overlapped speech rejected
STAGE_ORDER = ("decode", "vad", "quality", "speaker", "asr")
SEGMENT_BATCH = 8  # segments held in memory at once
SNAP_S = 1.6  # a cut at a change of voice moves to a pause this close (one speaker window: its precision)


@dataclass
class UnitResult:
    rejects: list[dict] = field(default_factory=list)
    samples: list[tuple[str, bytes, dict]] = field(default_factory=list)  # key, flac, metadata
    stats: dict = field(default_factory=lambda: {"files": 0, "input_s": 0.0, "kept_s": 0.0, "trimmed_s": 0.0})

    def reject(self, source: str, start: float, end: float, stage: str, reason: str, values: dict) -> None:
        self.rejects.append(
            {
                "source": source,
                "start": round(start, 3),
                "end": round(end, 3),
                "stage": stage,
                "reason": reason,
                "values": values,
            }
        )


def segment_key(source: str, index: int) -> str:
    """A key without dots, stable across runs, unique per (source, segment)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", source).strip("_")[-48:]
    return f"{slug}-{zlib.crc32(source.encode()):08x}-{index:04d}"


def _round(obj):
    if isinstance(obj, float | np.floating):
        return round(float(obj), 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_round(v) for v in obj]
    return obj


def _error(item: SourceItem, error: Exception) -> dict:
    message = f"{type(error).__name__}: {error}"
    if item.location:  # records stay the same wherever the data is mounted
        message = message.replace(item.location, item.source)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # names that are not UTF-8
    return {"error": message[:300]}


def _finite(blocks: Iterator[np.ndarray], count: list[int]) -> Iterator[np.ndarray]:
    """``blocks`` with NaN and infinite samples zeroed, their number appended to ``count``."""
    for block in blocks:
        bad = ~np.isfinite(block)
        if bad.any():
            count.append(int(bad.sum()))
            block = np.where(bad, 0.0, block).astype(np.float32)
        yield block


def process_item(item: SourceItem, cfg: S2Config, judges: JudgeSuite, out: UnitResult) -> float:
    """Clean one recording into ``out``; returns its duration in seconds."""
    src = item.source
    out.stats["files"] += 1
    try:
        reader = item.open()
    except Exception as error:  # any decoder failure rejects the file; it never stops the run
        out.reject(src, 0.0, 0.0, "decode", "unreadable", _error(item, error))
        return 0.0
    try:
        duration = reader.duration
        out.stats["input_s"] += duration
        if reader.frames == 0:
            out.reject(src, 0.0, 0.0, "decode", "empty_audio", {"frames": 0})
            return 0.0
        if duration < cfg.judges.vad.min_segment_s:  # no segment of it could be kept: not worth a judge
            out.reject(src, 0.0, duration, "vad", "too_short", {"duration": round(duration, 3)})
            return duration
        vad = judges.vad  # built on first use, outside the try: a judge that cannot load stops the run
        non_finite: list[int] = []
        try:
            blocks = _finite(stream_mono(reader, JUDGE_RATE, cfg.clean.block_s), non_finite)
            probs = vad.probabilities(blocks)
        except Exception as error:  # a file that breaks part-way through decoding
            out.reject(
                src,
                0.0,
                duration,
                "decode",
                "unreadable",
                _error(item, error),
            )
            return duration
        if non_finite:  # NaN or infinite samples: no judge can measure them, and no shard may hold them
            out.reject(src, 0.0, duration, "decode", "non_finite_samples", {"samples": sum(non_finite)})
            return duration
        regions = speech_regions(probs, cfg.judges.vad, duration)
        if not regions:
            out.reject(
                src, 0.0, duration, "vad", "no_speech", {"max_speech_prob": float(probs.max(initial=0.0))}
            )
            return duration
        segments, short = plan_segments(regions, cfg.judges.vad)
        out.stats["trimmed_s"] += duration - sum(s.duration for s in segments + short)
        everything = sorted(segments + short, key=lambda s: s.start)
        index = {id(s): i for i, s in enumerate(everything)}
        for s in short:
            out.reject(src, s.start, s.end, "vad", "too_short", {"duration": round(s.duration, 3)})
        for first in range(0, len(segments), SEGMENT_BATCH):
            batch = segments[first : first + SEGMENT_BATCH]
            _judge_segments(
                item, reader, batch, [index[id(s)] for s in batch], len(everything), cfg, judges, out
            )
        return duration
    finally:
        reader.close()


def _speech_only(wav: np.ndarray, seg: Segment) -> np.ndarray:
    """The segment's 16 kHz audio with its internal pauses cut out."""
    parts = [
        wav[int((a - seg.start) * JUDGE_RATE) : int((b - seg.start) * JUDGE_RATE)] for a, b in seg.regions
    ]
    return np.concatenate(parts) if parts else wav


@dataclass
class Part:
    """A one-voice stretch of a segment (the segment itself when it has one voice) on its way to a shard."""

    segment: Segment
    quality: dict
    excerpt: Excerpt
    key: str
    voice: int | None  # which voice of a recording that changes voice, else None


def _speech_time(seg: Segment, offset: float) -> float:
    """The time in the recording of ``offset`` seconds into the segment's speech (pauses cut out)."""
    for a, b in seg.regions:
        if offset <= b - a:
            return a + offset
        offset -= b - a
    return seg.end


def _snap(t: float, seg: Segment, lo: float, hi: float, edge: str) -> float:
    """``t`` moved to the nearest pause of ``seg`` whose middle lies in ``[t - lo, t + hi]``: to the pause's
    start for the end of a part (``edge="end"``), to its end for the start of one."""
    near = [(a, b) for a, b in seg.pauses if t - lo <= (a + b) / 2 <= t + hi]
    if not near:
        return t
    a, b = min(near, key=lambda p: abs((p[0] + p[1]) / 2 - t))
    return a if edge == "end" else b


def _voice_parts(seg: Segment, turns: list[Turn]) -> list[tuple[Segment, Turn]]:
    """The turns of ``seg`` as segments of the recording: cuts between two voices snap to the nearest pause
    within ``SNAP_S`` (people change turns at pauses; the embeddings place a change to about a window);
    the edges of an overlapped turn only ever move away from the overlap."""
    out = []
    for i, turn in enumerate(turns):
        start, end = _speech_time(seg, turn.start), _speech_time(seg, turn.end)
        if turn.voice != OVERLAP:
            if i:
                overlap_before = turns[i - 1].voice == OVERLAP
                start = _snap(start, seg, 0.0 if overlap_before else SNAP_S, SNAP_S, "start")
            else:
                start = seg.start
            if i < len(turns) - 1:
                overlap_after = turns[i + 1].voice == OVERLAP
                end = _snap(end, seg, SNAP_S, 0.0 if overlap_after else SNAP_S, "end")
            else:
                end = seg.end
        regions = [(max(a, start), min(b, end)) for a, b in seg.regions if b > start and a < end]
        out.append((Segment(start, end, regions), turn))
    return out


def _split_voices(item, seg, excerpt, index, q, cfg: S2Config, judges: JudgeSuite, out) -> list[Part]:
    """``seg`` as one-voice parts; overlapped speech and parts too short to keep become rejects."""
    src, key = item.source, segment_key(item.source, index)
    turns = judges.speaker.turns(_speech_only(excerpt.judge, seg))
    if len(turns) == 1:
        return [Part(seg, q, excerpt, key, None)]
    parts, pieces = [], _voice_parts(seg, turns)
    out.stats["trimmed_s"] += seg.duration - sum(part.duration for part, _ in pieces)  # pauses at the cuts
    for p, (part, turn) in enumerate(pieces):
        values = {"voice": turn.voice, "turns": len(turns), **turn.values}
        if turn.voice == OVERLAP:
            out.reject(src, part.start, part.end, "speaker", "overlapped_speech", values)
        elif part.duration < cfg.judges.vad.min_segment_s:
            out.reject(
                src, part.start, part.end, "speaker", "too_short", {**values, "duration": part.duration}
            )
        else:
            cut = excerpt.cut(part.start - seg.start, part.end - seg.start, cfg.clean.sample_rate, JUDGE_RATE)
            parts.append(Part(part, q, cut, f"{key}-{p}", turn.voice))
    return parts


def _judge_segments(
    item, reader, segments, indices, n_segments, cfg: S2Config, judges: JudgeSuite, out: UnitResult
):
    src = item.source
    excerpts = [read_excerpt(reader, s.start, s.end, cfg.clean.sample_rate, JUDGE_RATE) for s in segments]
    quality = judges.quality([e.judge for e in excerpts], [(e.native, e.native_rate) for e in excerpts])
    parts: list[Part] = []
    for seg, excerpt, index, q in zip(segments, excerpts, indices, quality):
        reason = judges.quality.verdict(q)
        if reason:
            out.reject(src, seg.start, seg.end, "quality", reason, _round(q))
        else:
            parts += _split_voices(item, seg, excerpt, index, q, cfg, judges, out)
    speaker = judges.speaker([_speech_only(p.excerpt.judge, p.segment) for p in parts]) if parts else []
    passed = []
    for part, scores in zip(parts, speaker):
        reason = judges.speaker.verdict(scores)
        if reason:
            out.reject(src, part.segment.start, part.segment.end, "speaker", reason, scores)
        else:
            passed.append((part, scores))
    transcripts = judges.asr([p.excerpt.judge for p, _ in passed], [item.lang] * len(passed))
    for (part, scores), t in zip(passed, transcripts):
        seg, q, key = part.segment, part.quality, part.key
        reason, values = transcript_checks(t, cfg.judges.asr)
        if reason:
            out.reject(src, seg.start, seg.end, "asr", reason, {**values, "asr_text": t.text})
            continue
        pauses = [(a - seg.start, b - seg.start) for a, b in seg.pauses]
        speech_s = sum(b - a for a, b in seg.regions)
        described = judges.captioner(
            key,
            part.excerpt.judge,
            t.text,
            t.words,
            pauses,
            speech_s,
            {"snr_db": q["snr_db"], "bandwidth_hz": q["bandwidth_hz"]},
        )
        own_text = item.text if (item.text and n_segments == 1 and part.voice is None) else None
        speaker_id = item.speaker or f"src-{zlib.crc32(src.encode()):08x}"
        if part.voice is not None:  # a segment that changes voice: its voices, told apart within it
            speaker_id = f"{speaker_id}-{key.rsplit('-', 2)[-2]}v{part.voice}"
        meta = _round(
            {
                "id": key,
                "source": src,
                "start": seg.start,
                "end": seg.end,
                "duration": seg.duration,
                "sample_rate": cfg.clean.sample_rate,
                "lang": t.lang,
                "lang_prob": t.lang_prob,
                "text": own_text or t.text,
                "text_source": "given" if own_text else "asr",  # from the data, or the ASR's
                "asr_text": t.text,
                "asr_logprob": t.avg_logprob,
                "asr_backend": cfg.judges.asr.backend if t.supported else None,
                "speaker": speaker_id,
                "dnsmos": q["dnsmos"],
                "snr_db": q["snr_db"],
                "bandwidth_hz": q["bandwidth_hz"],
                "clipping": q["clipping"],
                "speaker_similarity": scores["min_similarity"],
                "pitch_hz": described["pitch_hz"],
                "pitch_std": described["pitch_std"],
                "voiced_ratio": described["voiced_ratio"],
                "speaking_rate": described["speaking_rate"],
                "loudness_lufs": described["loudness_lufs"],
                "caption": described["caption"],
                "tags": described["tags"],
                "pipeline_version": PIPELINE_VERSION,
            }
        )
        out.samples.append((key, flac_bytes(part.excerpt.out, cfg.clean.sample_rate), meta))
        out.stats["kept_s"] += seg.duration


def _plan(items: list[SourceItem], files_per_shard: int) -> dict:
    digest = hashlib.sha256("\n".join(f"{i.source}\t{i.version}" for i in items).encode()).hexdigest()[:16]
    return {
        "files": len(items),
        "files_per_shard": files_per_shard,
        "sources_sha256": digest,
        "units": (len(items) + files_per_shard - 1) // files_per_shard,
    }


def run(cfg: S2Config) -> dict:
    run_dir = Path(cfg.run_dir)
    items = list_items(cfg.data)
    if not items:
        raise ValueError(f"no audio found at data.path={cfg.data.path} (data.source={cfg.data.source})")
    plan = _plan(items, cfg.clean.files_per_shard)
    plan_file = run_dir / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan:
        raise ValueError(
            f"{run_dir} holds a clean run over other inputs or another clean.files_per_shard "
            f"({plan_file}); give this run its own run_dir= or name="
        )
    write_json_atomic(plan_file, plan)
    ledger = UnitLedger(run_dir, plan["units"], cfg.data.partition, cfg.data.num_partitions)
    per = cfg.clean.files_per_shard
    todo = ledger.todo
    started, audio_s = time.perf_counter(), 0.0
    if todo:
        if cfg.judges.threads:
            torch.set_num_threads(cfg.judges.threads)
        judges = JudgeSuite(cfg.judges, cfg.seed)  # each judge loads on first use, once per process
        judges.check_paths()  # a missing local model stops the run before any unit starts
        bar = tqdm(
            total=sum(len(items[u * per : (u + 1) * per]) for u in todo),
            unit="file",
            desc=f"clean p{cfg.data.partition}/{cfg.data.num_partitions}",
            disable=not cfg.clean.progress,
        )
        for u in todo:
            result = UnitResult()
            for item in items[u * per : (u + 1) * per]:
                audio_s += process_item(item, cfg, judges, result)
                bar.update(1)
                bar.set_postfix(
                    audio=f"{audio_s:.0f}s", speed=f"{audio_s / (time.perf_counter() - started):.1f}x"
                )
            shard = f"shard-{u:06d}.tar" if result.samples else None
            if shard:
                write_tar(
                    ledger.shards_dir / shard,
                    (
                        member
                        for key, flac, meta in result.samples
                        for member in ((f"{key}.flac", flac), (f"{key}.json", _json_bytes(meta)))
                    ),
                )
            manifest = [{**meta, "shard": f"shards/{shard}"} for _, _, meta in result.samples]
            ledger.finish(
                u,
                {
                    "shard": shard,
                    "sources": [i.source for i in items[u * per : (u + 1) * per]],
                    "manifest": manifest,
                    "rejects": result.rejects,
                    "stats": _round(result.stats),
                },
            )
        bar.close()
    with ledger.merging():  # another partition may be merging its own end right now
        stats = aggregate(run_dir, ledger.records(), plan["units"])
    wall = time.perf_counter() - started
    return {
        "units_done": f"{stats['units_done']}/{stats['units_total']}",
        "files": stats["files"],
        "input_h": round(stats["input_s"] / 3600, 4),
        "kept_h": round(stats["kept_s"] / 3600, 4),
        "kept_segments": stats["kept_segments"],
        "rejected_segments": stats["rejected_segments"],
        "kept_fraction_of_input": round(stats["kept_s"] / max(stats["input_s"], 1e-9), 4),
        "this_run_audio_s": round(audio_s, 1),
        "this_run_x_realtime": round(audio_s / wall, 2) if audio_s else 0.0,
        "by_stage": stats["by_stage"],
    }


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def aggregate(run_dir: Path, markers: list[dict], units_total: int) -> dict:
    """Rebuild manifest.jsonl, rejects.jsonl, stats.json (and stats.png) from the unit markers."""
    manifest = [row for m in markers for row in m["manifest"]]
    rejects = [row for m in markers for row in m["rejects"]]
    write_text_atomic(
        run_dir / "manifest.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in manifest)
    )
    write_text_atomic(
        run_dir / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    )
    totals = {
        k: round(sum(m["stats"][k] for m in markers), 3) for k in ("files", "input_s", "kept_s", "trimmed_s")
    }
    by_stage: dict[str, dict[str, dict]] = {s: {} for s in STAGE_ORDER}
    for r in rejects:
        cell = by_stage[r["stage"]].setdefault(r["reason"], {"count": 0, "seconds": 0.0})
        cell["count"] += 1
        cell["seconds"] = round(cell["seconds"] + r["end"] - r["start"], 3)
    rejected_s = round(sum(c["seconds"] for reasons in by_stage.values() for c in reasons.values()), 3)
    stats = {
        "units_done": len(markers),
        "units_total": units_total,
        "complete": len(markers) == units_total,
        **totals,
        "rejected_s": rejected_s,
        "kept_segments": len(manifest),
        "rejected_segments": len(rejects),
        "by_stage": by_stage,
        "pipeline_version": PIPELINE_VERSION,
    }
    write_json_atomic(run_dir / "stats.json", stats)
    _plot_stats(run_dir / "stats.png", stats)
    return stats


def _plot_stats(path: Path, stats: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["kept", "trimmed (non-speech)"]
    seconds = [stats["kept_s"], stats["trimmed_s"]]
    for stage, reasons in stats["by_stage"].items():
        for reason, cell in reasons.items():
            labels.append(f"{stage}: {reason} ({cell['count']})")
            seconds.append(cell["seconds"])
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(labels) + 1.2))
    colors = ["tab:green", "tab:gray"] + ["tab:red"] * (len(labels) - 2)
    ax.barh(labels[::-1], seconds[::-1], color=colors[::-1])
    ax.set_xlabel("seconds of audio")
    ax.set_title(
        f"clean: {stats['files']} files, {stats['input_s'] / 60:.1f} min in, {stats['kept_s'] / 60:.1f} min kept"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
