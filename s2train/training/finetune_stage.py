"""``stage=finetune``: a trained model learns one person's voice from a folder of their recordings.

The folder (``finetune.input``) holds recordings of any length in any format the clean stage reads; their
transcripts come from a ``metadata.jsonl``, from a ``.txt`` or ``.lab`` file beside each recording, or,
where there is none, from the ASR judge. The stage composes the shared pieces, in its run directory:

1. ``clean/``: the clean stage's judges over the folder, with keep rules for a small personal dataset
   (``finetune.keep``: a home recording scores lower on DNSMOS and SNR than a studio corpus, and short
   clips are all a person may have); every rejected file is in ``clean/rejects.jsonl`` with its reason.
2. ``tokenize/``: the clips through the codec the model was trained with.
3. Training on the shared trainer (``pretrain_stage.train_dual_ar``: checkpoints, exact resume, losses and
   their curve) from ``finetune.init``, a pretrain/SFT run or a released S2 Pro folder, with either
   **LoRA** adapters (peft, on the layers ``finetune.lora.target_modules`` names; every weight of the
   model stays as it was) or **all weights**; ``finetune.freeze_fast`` keeps the fast model as it is.
   The voice is the model's default (``finetune.speaker=0``) or gets its own ``<|speaker:i|>``;
   ``finetune.mix`` keeps some examples with a reference clip of the voice (cloning plus adaptation).
4. The model: ``model.safetensors`` + ``model.json`` (merged, opened by synthesis and evaluation like any
   other), and with LoRA ``adapter/`` (the adapter alone, which ``open_dual_ar`` also opens);
   ``finetune.export_release`` also writes ``release/``, the released ``fish_qwen3_omni`` layout.
5. A before/after check on recordings held out of training (``finetune.heldout`` of them, or those
   ``finetune.heldout_sources`` names): the starting model cloning the voice from a reference clip against
   the fine-tuned model without and with that clip: word error rate (ASR judge) and speaker similarity to
   the held-out recording, in ``heldout/report.md``, ``heldout/scores.png`` and the results; the clips are
   in ``heldout/wav/``.

    python -m s2train stage=finetune name=me finetune.input=/data/my_voice finetune.init=runs/demo/sft \\
        tokenize.codec=runs/demo/codec/codec.pt
    python -m s2train stage=finetune name=me finetune.input=/data/my_voice finetune.init=/models/s2-pro \\
        tokenize.codec=/models/s2-pro text.n_semantic=4096 finetune.export_release=true
    sbatch slurm/finetune.sbatch name=me finetune.input=/data/my_voice finetune.init=/models/s2-pro ...
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

from s2train.audio import read_mono, resample
from s2train.checkpoints import (
    LoraSettings,
    add_lora,
    export_release,
    lora_targets,
    open_dual_ar,
    save_adapter,
)
from s2train.checks import check
from s2train.compat.fish_dual_ar import check_exportable
from s2train.inference.synthesis import Synthesizer, Utterance
from s2train.judges import JUDGE_RATE
from s2train.judges.suite import JudgeSuite
from s2train.judges.wer import wer
from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.runs import atomic_path, stage_input, write_json_atomic, write_text_atomic
from s2train.shards import read_tar
from s2train.text.tokenizer import model_tokenizer, speaker_token
from s2train.training.lm_data import ExampleMix, TarShards, open_token_source
from s2train.training.lm_module import LMTrainConfig
from s2train.training.pretrain_stage import train_dual_ar
from s2train.training.sft_stage import open_trainable

if TYPE_CHECKING:
    from s2train.config import S2Config


@dataclass
class FinetuneKeep:
    """The clean stage's keep rules for one person's recordings (None: ``judges``' own)."""

    dnsmos_ovrl_min: float | None = 2.5  # a quiet room with a laptop microphone scores 2.5-3; studio 3+
    snr_min_db: float | None = 10.0
    min_segment_s: float | None = 1.0  # short clips are often all a person has recorded


def _finetune_mix() -> ExampleMix:
    return ExampleMix(plain=0.7, cloning=0.3)


def _finetune_train() -> LMTrainConfig:
    return LMTrainConfig(max_steps=300, lr=2e-4, warmup_steps=20, min_lr_ratio=0.1, checkpoint_every=100)


@dataclass
class FinetuneConfig:
    """``stage=finetune`` (``s2train.training.finetune_stage``)."""

    input: str | None = None  # a folder of one speaker's recordings (transcripts beside them or none)
    voice: str = "voice"  # the speaker name the records give these recordings
    init: str | None = None  # a run with model.safetensors + model.json or a released S2 Pro folder;
    # None: run_root/name/sft
    codec: str | None = None  # the codec the model was trained with; None: tokenize.codec
    method: str = "lora"  # lora | full
    lora: LoraSettings = field(default_factory=LoraSettings)
    freeze_fast: bool = False  # the fast model keeps its weights (and gets no adapters)
    speaker: int = 0  # 0: the voice becomes the default; i: prompts name it <|speaker:i|>
    mix: ExampleMix = field(default_factory=_finetune_mix)  # plain, and cloning from the voice's own clips
    keep: FinetuneKeep = field(default_factory=FinetuneKeep)
    # Token data of what the model learnt before (a tokenize run of its corpus), trained on beside the voice
    # so that the model keeps it: a small model forgets the rest of its speech in a few steps on one voice
    replay: str | None = None
    replay_share: float = 0.5  # about this share of the utterances of an epoch come from replay
    # replayed utterances as examples of these kinds: cloning only (the default) keeps what the model can
    # say and in which voices when given a reference, and leaves the voice without one to the new voice
    replay_mix: ExampleMix = field(default_factory=lambda: ExampleMix(plain=0.0, cloning=1.0))
    heldout: int = 4  # recordings held out of training for the before/after check; 0: no check
    heldout_sources: list[str] = field(default_factory=list)  # globs of file names: these instead
    heldout_check: bool = True  # speak and score the held-out texts after training (false: only hold out)
    export_release: bool = False  # also write release/ in the released fish_qwen3_omni layout
    export_dtype: str = "float32"  # release/'s weights: float32 (exact) | bfloat16 (the release's, half)
    train: LMTrainConfig = field(default_factory=_finetune_train)

    def __post_init__(self) -> None:
        check(self.method in ("lora", "full"), f"finetune.method must be lora or full, not {self.method!r}")
        check(self.speaker >= 0, "finetune.speaker cannot be negative")
        check(self.heldout >= 0, "finetune.heldout cannot be negative")
        check(0 < self.replay_share < 1, f"finetune.replay_share must be in (0, 1), not {self.replay_share}")
        check(
            self.export_dtype in ("float32", "bfloat16"),
            f"finetune.export_dtype must be float32 or bfloat16, not {self.export_dtype!r}",
        )


# ---------------------------------------------------------------------------------------------- data


def _rank() -> int:
    """This process's global rank where a launcher says it (SLURM, torchrun), else 0."""
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))


def personal_judges(cfg: S2Config):
    """``cfg.judges`` with ``finetune.keep``'s thresholds."""
    keep, judges = cfg.finetune.keep, cfg.judges
    quality, vad = judges.quality, judges.vad
    if keep.dnsmos_ovrl_min is not None:
        quality = dataclasses.replace(quality, dnsmos_ovrl_min=keep.dnsmos_ovrl_min, calibration=None)
    if keep.snr_min_db is not None:
        quality = dataclasses.replace(quality, snr_min_db=keep.snr_min_db)
    if keep.min_segment_s is not None:
        vad = dataclasses.replace(vad, min_segment_s=keep.min_segment_s)
    return dataclasses.replace(judges, quality=quality, vad=vad)


def prepare_data(cfg: S2Config, codec: str) -> dict:
    """``clean/`` and ``tokenize/`` of the input folder in the run directory (each resumes and skips
    what it finished, as the stages do); returns their headline figures and the keep rules used."""
    from s2train.cli import run_stage  # the dispatcher: records each part's config and results

    f, run_dir = cfg.finetune, Path(cfg.run_dir)
    data = dataclasses.replace(
        cfg.data, source="folder", path=f.input, speaker=f.voice, partition=0, num_partitions=1
    )
    judges = personal_judges(cfg)
    clean = run_stage(
        dataclasses.replace(cfg, stage="clean", run_dir=str(run_dir / "clean"), data=data, judges=judges)
    )
    tokens = run_stage(
        dataclasses.replace(
            cfg,
            stage="tokenize",
            run_dir=str(run_dir / "tokenize"),
            tokenize=dataclasses.replace(cfg.tokenize, input=str(run_dir / "clean"), codec=codec),
        )
    )
    return {
        "kept_segments": clean["kept_segments"],
        "rejected_segments": clean["rejected_segments"],
        "kept_minutes": round(clean["kept_h"] * 60, 2),
        "rejected_by": {
            f"{stage}:{reason}": cell["count"]
            for stage, reasons in clean["by_stage"].items()
            for reason, cell in reasons.items()
        },
        "keep_rules": {
            "dnsmos_ovrl_min": judges.quality.dnsmos_ovrl_min,
            "snr_min_db": judges.quality.snr_min_db,
            "min_segment_s": judges.vad.min_segment_s,
            "speaker_min_similarity": judges.speaker.min_similarity,
        },
        "tokenized_utterances": tokens["utterances"],
    }


def heldout_split(cfg: S2Config, manifest: list[dict]) -> tuple[list[dict], list[str]]:
    """The clean utterances held out of training and the recordings (sources) they come from: those
    ``finetune.heldout_sources`` matches, else ``finetune.heldout`` recordings picked by a hash of their
    name (the same on every run)."""
    f = cfg.finetune
    sources = sorted({row["source"] for row in manifest})
    if f.heldout_sources:
        chosen = [s for s in sources if any(fnmatch.fnmatchcase(s, p) for p in f.heldout_sources)]
        if not chosen:
            raise ValueError(
                f"finetune.heldout_sources={f.heldout_sources} matches none of the kept recordings "
                f"({sources[:4]}, ...)"
            )
    else:
        chosen = sorted(sources, key=lambda s: zlib.crc32(s.encode()))[: f.heldout]
    if len(chosen) >= len(sources):
        raise ValueError(
            f"holding out {len(chosen)} of the {len(sources)} kept recordings leaves nothing to train on; "
            "lower finetune.heldout or record more"
        )
    rows = [row for row in manifest if row["source"] in chosen]
    return sorted(rows, key=lambda r: r["id"]), chosen


def replay_plan(cfg: S2Config, voice: list[Path], voice_utterances: int) -> tuple[list[Path], dict]:
    """The token tars to train on: the voice's, and ``finetune.replay``'s so that about
    ``finetune.replay_share`` of an epoch's utterances are replayed: a seeded choice of the replay
    corpus's shards when it is larger than that, all of them listed several times when it is smaller.
    Utterances per replay shard come from its ``stats.json`` (a tokenize run's)."""
    f = cfg.finetune
    if not f.replay:
        return voice, {}
    source = open_token_source(f.replay)
    if not isinstance(source, TarShards):
        raise ValueError(
            f"finetune.replay={f.replay} must be token shards (a tokenize run or a folder of .tar)"
        )
    stats = Path(f.replay) / "stats.json"
    total = (json.loads(stats.read_text()).get("utterances") if stats.is_file() else None) or 64 * len(
        source.paths
    )
    per_shard = total / len(source.paths)
    wanted = voice_utterances * f.replay_share / (1 - f.replay_share)
    if total > wanted:
        n = max(1, round(wanted / per_shard))
        order = np.random.default_rng(cfg.seed).permutation(len(source.paths))[:n]
        replay, repeats = [source.paths[i] for i in sorted(order)], 1
    else:
        replay, repeats = list(source.paths), max(1, round(wanted / total))
    plan = {
        "replay_shards": len(replay),
        "replay_repeats": repeats,
        "replay_utterances_per_epoch": round(per_shard * len(replay) * repeats),
    }
    return voice + replay * repeats, plan


# -------------------------------------------------------------------------------------------- model


def adapter_for(f: FinetuneConfig):
    """The function that makes the trainer's model a fine-tuning one: LoRA layers (every weight frozen)
    or all weights trainable, and the fast model frozen when asked."""

    def adapt(model: DualAR) -> None:
        if f.method == "lora":
            add_lora(model, f.lora)
        if f.freeze_fast:
            for p in model.fast.parameters():
                p.requires_grad_(False)

    return adapt


def run(cfg: S2Config) -> dict | None:
    f, run_dir = cfg.finetune, Path(cfg.run_dir)
    if not f.input or not Path(f.input).is_dir():
        raise ValueError(
            f"finetune.input={f.input} is not a folder: give the folder of the voice's recordings"
        )
    codec = f.codec or cfg.tokenize.codec
    if not codec:
        raise ValueError(
            "finetune.codec (or tokenize.codec) is required: the codec the model was trained with"
        )
    init = stage_input(cfg, "sft", f.init)
    if not any((init / name).is_file() for name in ("model.json", "config.json", "adapter_config.json")):
        raise ValueError(  # before the judges spend minutes on the folder
            f"finetune.init={init} is not a model: a pretrain or SFT run directory (model.json), a released "
            "S2 Pro folder (config.json) or a LoRA adapter (adapter_config.json)"
        )
    if f.export_release and (init / "model.json").is_file():  # a release folder is one already
        check_exportable(DualARConfig(**json.loads((init / "model.json").read_text())))
    marker = run_dir / "prepared.json"
    if _rank() == 0:
        prepared = prepare_data(cfg, codec)
        write_json_atomic(marker, prepared)
    else:  # the other ranks of a multi-process launch wait for rank 0's data
        while not marker.is_file():
            time.sleep(5)
        prepared = json.loads(marker.read_text())
    token_data = run_dir / "tokenize"
    model, tokenizer = open_trainable(cfg, init, token_data, "finetune.init")
    if f.method == "lora":
        lora_targets(model, f.lora.target_modules)  # a pattern that matches nothing stops the run here
    if f.speaker >= tokenizer.n_speakers:
        raise ValueError(
            f"finetune.speaker={f.speaker} but the tokenizer has <|speaker:0|>..<|speaker:"
            f"{tokenizer.n_speakers - 1}|>"
        )
    manifest = [json.loads(line) for line in (run_dir / "clean" / "manifest.jsonl").read_text().splitlines()]
    if not manifest:
        raise ValueError(
            f"no recording of {f.input} passed the judges: see {run_dir / 'clean' / 'rejects.jsonl'}"
        )
    heldout, held_sources = heldout_split(cfg, manifest) if (f.heldout or f.heldout_sources) else ([], [])
    data = dataclasses.replace(
        cfg.lm_data,
        mix=f.replay_mix,  # the replayed corpus's speakers; the voice's utterances have their own
        speaker_mix={**cfg.lm_data.speaker_mix, f.voice: f.mix},
        pace_mix={},  # the replay keeps its corpus's voices with replay_mix, whatever their pace
        speaker_ids={**cfg.lm_data.speaker_ids, f.voice: f.speaker},
        exclude_sources=[*cfg.lm_data.exclude_sources, *held_sources],
    )

    voice_shards = sorted((token_data / "shards").glob("*.tar"))
    shards, replay = replay_plan(cfg, voice_shards, len(manifest) - len(heldout))
    config, start = model.config, model.state_dict()
    del model  # the trainer builds its own and loads these weights

    def finish(state: dict) -> dict:
        if f.method != "lora":
            return state
        return save_adapter(state, config, f.lora, init, run_dir / "adapter")

    result = train_dual_ar(
        cfg,
        config,
        tokenizer,
        f.train,
        data,
        init_state=start,
        adapt=adapter_for(f),
        finish=finish,
        token_data=shards,
    )
    if result is None:
        return None
    result = {"init": str(init), "method": f.method, **result, "data": {**prepared, **replay}}
    if f.method == "lora":
        result["adapter"] = str(run_dir / "adapter")
    if f.export_release:
        tuned, release = open_dual_ar(run_dir)
        out = export_release(
            tuned, model_tokenizer(release, cfg.text), run_dir / "release", getattr(torch, f.export_dtype)
        )
        result["release"] = str(out)
    if heldout and f.heldout_check:
        result["heldout"] = compare_on_heldout(cfg, init, codec, heldout, manifest, held_sources)
    return result


# ------------------------------------------------------------------------------------------ held out


def _clip(run_dir: Path, row: dict, out: Path, shards: dict[str, dict]) -> Path:
    """A clean utterance's audio as a .wav file (read from its shard; ``shards`` keeps each shard read once)."""
    if not out.is_file():
        if row["shard"] not in shards:
            shards[row["shard"]] = read_tar(run_dir / "clean" / row["shard"])
        flac = shards[row["shard"]][row["id"]]["flac"]
        audio, rate = sf.read(io.BytesIO(flac), dtype="float32")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            sf.write(tmp, audio, rate, format="WAV", subtype="FLOAT")
    return out


def compare_on_heldout(
    cfg: S2Config, init: Path, codec: str, heldout: list[dict], manifest: list[dict], held: list[str]
) -> dict:
    """The starting model cloning the voice from one training clip, against the fine-tuned model without
    and with that clip, on the held-out recordings' texts: WER (ASR judge) and the speaker similarity of
    each clip to the held-out recording of the same text (``judges.speaker.backend``)."""
    f, run_dir = cfg.finetune, Path(cfg.run_dir)
    out = run_dir / "heldout"
    training = sorted(
        (r for r in manifest if r["source"] not in held), key=lambda r: (abs(r["duration"] - 4.0), r["id"])
    )
    reference = training[0]  # the training clip nearest 4 s: the voice as a cloning prompt gives it
    shards: dict[str, dict] = {}
    ref_wav = _clip(run_dir, reference, out / "reference.wav", shards)
    truths = [_clip(run_dir, row, out / "truth" / f"{i:03d}.wav", shards) for i, row in enumerate(heldout)]
    del shards
    tag = speaker_token(f.speaker) if f.speaker else ""
    systems = {
        "base_cloning": (init, True, ""),
        "finetuned": (run_dir, False, tag),
        "finetuned_cloning": (run_dir, True, tag),
    }
    judges = JudgeSuite(cfg.judges, cfg.seed)
    truth_embeddings = [judges.embedder.embed([read_mono(t, JUDGE_RATE)])[0] for t in truths]
    rows, scores = [], {}
    for name, (model, cloning, prefix) in systems.items():
        synth = Synthesizer.open(cfg.synthesize, cfg.text, model, codec)
        utterances = [
            Utterance(
                f"{name}-{i:03d}",
                prefix + row["text"],
                reference=ref_wav if cloning else None,
                reference_text=reference["text"] if cloning else None,
                seed=cfg.seed + i,
            )
            for i, row in enumerate(heldout)
        ]
        hyps, sims = {}, {}
        for spoken in synth.speak(utterances):
            i = int(spoken.utterance.id.rsplit("-", 1)[1])
            path = out / "wav" / f"{spoken.utterance.id}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, spoken.audio, synth.sample_rate)
            wav = resample(spoken.audio, synth.sample_rate, JUDGE_RATE)
            hyps[i] = judges.asr([wav], [heldout[i].get("lang") or "en"])[0].text
            if len(wav) >= JUDGE_RATE // 2:
                e = judges.embedder.embed([wav])[0]
                t = truth_embeddings[i]
                sims[i] = float(e @ t / max(np.linalg.norm(e) * np.linalg.norm(t), 1e-9))
            else:
                sims[i] = 0.0  # no audio to compare: as unlike the voice as can be
            rows.append(
                {
                    "system": name,
                    "id": heldout[i]["id"],
                    "text": heldout[i]["text"],
                    "hyp": hyps[i],
                    "sim": round(sims[i], 4),
                    "wav": str(path),
                }
            )
        del synth
        scores[name] = {
            "wer": round(100 * wer([r["text"] for r in heldout], [hyps[i] for i in range(len(heldout))]), 2),
            "sim": round(float(np.mean([sims[i] for i in range(len(heldout))])), 4),
        }
    write_text_atomic(
        out / "utterances.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    summary = {
        "utterances": len(heldout),
        "reference": reference["id"],
        **{f"{name}_{k}": v for name, s in scores.items() for k, v in s.items()},
    }
    summary["sim_gain"] = round(scores["finetuned"]["sim"] - scores["base_cloning"]["sim"], 4)
    summary["wer_change"] = round(scores["finetuned"]["wer"] - scores["base_cloning"]["wer"], 2)
    _plot(scores, out / "scores.png", cfg.name)
    write_text_atomic(out / "report.md", _report(summary, scores, f))
    return summary


def _plot(scores: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.5))
    a.bar(names, [scores[n]["sim"] for n in names], color=["#888", "#2a7", "#27a"])
    a.set_ylabel("speaker similarity to the held-out clip")
    b.bar(names, [scores[n]["wer"] for n in names], color=["#888", "#2a7", "#27a"])
    b.set_ylabel("WER (%)")
    for ax in (a, b):
        ax.tick_params(axis="x", labelrotation=15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title}: held-out recordings, before and after fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(summary: dict, scores: dict[str, dict], f: FinetuneConfig) -> str:
    lines = [
        "# Fine-tuning: held-out recordings",
        "",
        f"{summary['utterances']} recordings held out of training; the cloning prompt is the training clip "
        f"`{summary['reference']}`. Method: {f.method}.",
        "",
        "| system | speaker similarity | WER (%) |",
        "|---|---|---|",
        *(f"| {name} | {s['sim']:.3f} | {s['wer']:.1f} |" for name, s in scores.items()),
        "",
        f"Similarity gain of the fine-tuned model over the starting model cloning the voice: "
        f"{summary['sim_gain']:+.3f}; WER change: {summary['wer_change']:+.1f} points.",
        "",
    ]
    return "\n".join(lines)
