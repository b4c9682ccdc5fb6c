"""``stage=emergent``: EmergentTTS-Eval, expressive and hard prompts, each judged by an audio-capable
LLM against a baseline system's audio of the same text; win rates per category.

The harness follows the upstream one (boson-ai/EmergentTTS-Eval-public) in behaviour, read from it, not
copied:

- **Prompts**: a local copy of the ``bosonai/EmergentTTS-Eval`` dataset (``eval.emergent.data``): the
  folder ``datasets``' ``save_to_disk`` wrote, or the JSONL upstream's ``download_data.py`` writes with its
  ``baseline_audios/<i>.wav``. Each row's place in the dataset is its id (upstream's ``unique_id_eval``);
  its fields ``category``, ``text_to_synthesize``, ``evolution_depth`` and the baseline ``audio``.
- **Our audio**: the text spoken through the shared synthesis call into ``wav/emergent-<id>.wav`` (or
  read from ``eval.gen_dir``), resumable.
- **The judge**: any OpenAI-compatible chat-completions endpoint (``judge_url``, ``judge_model``; the key
  from the environment variable ``judge_api_key_env``), given the system prompt, the user message with the
  text, its category and the category's criterion filled in, the first audio, the message that follows
  it, and the second audio (16 kHz mono 16-bit WAV, base64 ``input_audio`` parts). The judging texts are
  upstream's own, read from its ``prompts.py`` (``eval.emergent.prompts``) by parsing the file: its
  literal constants are taken, nothing in it is run. Which system comes first is drawn once per prompt
  from its id (``numpy.random.default_rng(id).random() > 0.5``: the baseline first), as upstream does,
  so every system meets the baseline in the same order.
- **Scoring**: the judge's JSON names the winner (1, 2, or 0 for a tie). A win counts 1, a tie 0.5, a
  loss 0; an answer that cannot be parsed or lacks a field counts in ``parse_failures`` and not in the
  rates. Win and tie rates are means over the judged prompts, overall (every prompt weighs the same)
  and per category and per category x evolution depth.
- **Resumable per prompt**: every judgement is appended to ``judgements.jsonl`` as it comes; a rerun
  judges only the prompts without one (a judge call that fails after its retries is not written).

Outputs in the run directory (``run_root/name/emergent``, beside ``eval``'s Seed-TTS-Eval report):
``judgements.jsonl``, ``results.json`` and ``report.md``. The settings are ``eval.emergent.*``.

    EMERGENT_JUDGE_API_KEY=... python -m s2train stage=emergent name=mine \\
        eval.emergent.data=/data/emergent_tts_eval eval.emergent.prompts=/src/EmergentTTS-Eval-public/prompts.py \\
        eval.emergent.judge_url=https://generativelanguage.googleapis.com/v1beta/openai \\
        eval.emergent.judge_model=gemini-2.5-pro
    python -m s2train experiment=demo stage=emergent            # the demo model, the offline stand-in judge
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf

from s2train.audio import read_mono, resample
from s2train.checks import check
from s2train.judges import JUDGE_RATE
from s2train.runs import append_jsonl, jsonl_lines, read_appended, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from s2train.config import S2Config

CATEGORIES = (
    "Emotions",
    "Paralinguistics",
    "Syntactic Complexity",
    "Foreign Words",
    "Questions",
    "Pronunciation",
)
PROMPT_NAMES = (
    "SYSTEM_PROMPT_JUDGER",
    "USER_MESSAGE_WIN_RATE",
    "POST_AUDIO_1_MESSAGE",
    "CATEGORY_TO_CRITERION_MAP",
)
OFFLINE = "offline"  # judge_url for the stand-in judge that runs here (OfflineJudge)
ANSWER_KEYS = (
    "reasoning_system_1",
    "reasoning_system_2",
    "system_comparison",
    "score_1",
    "score_2",
    "winner",
)


@dataclass
class EmergentConfig:
    """``eval.emergent``: EmergentTTS-Eval (module docstring)."""

    data: str | None = None  # the dataset's save_to_disk folder, or upstream's emergent_tts_eval_data.jsonl
    baseline_dir: str | None = None  # with a JSONL: the folder of <i>.wav; None: baseline_audios beside it
    prompts: str | None = None  # upstream's prompts.py (parsed, never run), or a JSON of the four texts
    judge_url: str | None = None  # an OpenAI-compatible base URL, e.g. https://host/v1; offline: the stand-in
    judge_model: str = "gemini-2.5-pro"
    judge_api_key_env: str = "EMERGENT_JUDGE_API_KEY"  # the environment variable holding the key
    temperature: float = 0.0
    top_p: float = 0.9
    max_tokens: int = 8192
    timeout_s: float = 300.0
    retries: int = 3  # a judge call that fails is tried this many times more, 10 s apart
    retry_wait_s: float = 10.0
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))
    depths: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    limit: int | None = None  # the first N prompts (after the category and depth filters)

    def __post_init__(self) -> None:
        check(self.retries >= 0 and self.timeout_s > 0, "eval.emergent.retries >= 0 and timeout_s > 0")
        check(self.limit is None or self.limit >= 1, "eval.emergent.limit must be at least 1")
        check(
            0 <= self.top_p <= 1 and self.temperature >= 0, "eval.emergent.top_p in [0, 1], temperature >= 0"
        )


@dataclass(frozen=True)
class Prompt:
    """One row of the dataset."""

    id: int
    category: str
    text: str
    depth: int
    baseline: np.ndarray  # float32 mono at JUDGE_RATE

    @property
    def name(self) -> str:
        return f"emergent-{self.id:05d}"


# --------------------------------------------------------------------------------------------- data


def _audio(value: Any, where: str) -> np.ndarray:
    """A dataset audio cell ({array, sampling_rate}) or a file, as float32 mono at JUDGE_RATE."""
    if isinstance(value, dict) and "array" in value and "sampling_rate" in value:
        samples = np.asarray(value["array"], dtype=np.float32)
        return resample(
            samples if samples.ndim == 1 else samples.mean(axis=1), int(value["sampling_rate"]), JUDGE_RATE
        )
    try:
        return read_mono(value, JUDGE_RATE)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise ValueError(f"{where}: cannot read the audio ({error})") from error


def load_prompts(e: EmergentConfig) -> list[Prompt]:
    """The dataset's rows that pass the category and depth filters, in dataset order."""
    if not e.data:
        raise ValueError(
            "eval.mode=emergent needs eval.emergent.data: the folder datasets' save_to_disk wrote of "
            "bosonai/EmergentTTS-Eval, or upstream's emergent_tts_eval_data.jsonl"
        )
    path = Path(e.data).expanduser()
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        rows = ((i, row, f"{path} row {i}") for i, row in enumerate(dataset))
        baseline = None
    elif path.is_file():
        baseline = Path(e.baseline_dir).expanduser() if e.baseline_dir else path.parent / "baseline_audios"
        rows = ((i, row, where) for i, (_, where, row) in enumerate(jsonl_lines(path)))
    else:
        raise ValueError(f"eval.emergent.data={path} is neither a dataset folder nor a JSONL file")
    out = []
    for i, row, where in rows:
        if not isinstance(row, dict) or not all(k in row for k in ("category", "text_to_synthesize")):
            raise ValueError(f'{where} needs "category" and "text_to_synthesize"')
        depth = int(row.get("evolution_depth", 0))
        if row["category"] not in e.categories or depth not in e.depths:
            continue
        text = row["text_to_synthesize"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: text_to_synthesize is empty")
        if baseline is None:
            if "audio" not in row:
                raise ValueError(f'{where} has no "audio": the baseline system\'s speech')
            audio = _audio(row["audio"], where)
        else:
            file = baseline / f"{i}.wav"
            if not file.is_file():
                raise ValueError(f"{where}: no baseline audio {file}")
            audio = _audio(file, where)
        out.append(Prompt(i, row["category"], text, depth, audio))
        if e.limit and len(out) >= e.limit:
            break
    if not out:
        raise ValueError(
            f"no prompt of {path} is in eval.emergent.categories={e.categories} and depths={e.depths}"
        )
    return out


def read_judge_texts(path: str | Path | None) -> dict[str, Any]:
    """The judging texts: ``SYSTEM_PROMPT_JUDGER``, ``USER_MESSAGE_WIN_RATE``, ``POST_AUDIO_1_MESSAGE`` and
    ``CATEGORY_TO_CRITERION_MAP``, from upstream's ``prompts.py`` (its literal assignments, at module level
    or in a class, parsed with ``ast``: nothing in the file is run) or from a JSON file of them."""
    if not path:
        raise ValueError(
            "eval.emergent.prompts is required: upstream's prompts.py (EmergentTTS-Eval-public), whose judging "
            "texts are read without running it, or a JSON file holding " + ", ".join(PROMPT_NAMES)
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"eval.emergent.prompts={path} is not a file")
    if path.suffix == ".json":
        found = json.loads(path.read_text(encoding="utf-8"))
    else:
        found = {}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bodies = [tree.body] + [node.body for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
        for body in bodies:
            for node in body:
                if (
                    isinstance(node, ast.Assign)
                    and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                ):
                    name = node.targets[0].id
                    if name in PROMPT_NAMES:
                        try:
                            found[name] = ast.literal_eval(node.value)
                        except ValueError as error:
                            raise ValueError(f"{path}: {name} is not a literal ({error})") from error
    missing = [name for name in PROMPT_NAMES if name not in found]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    if not all(isinstance(found[n], str) for n in PROMPT_NAMES[:3]) or not isinstance(
        found[PROMPT_NAMES[3]], dict
    ):
        raise ValueError(f"{path}: the three messages must be strings and the criteria a mapping")
    return found


# -------------------------------------------------------------------------------------------- judge


def baseline_first(prompt_id: int) -> bool:
    """Whether the baseline is the first system the judge hears for this prompt (upstream's draw)."""
    return bool(np.random.default_rng(prompt_id).random() > 0.5)


def ordered(prompt: Prompt, ours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two recordings in the order the judge hears them."""
    return (prompt.baseline, ours) if baseline_first(prompt.id) else (ours, prompt.baseline)


class OfflineJudge:
    """``judge_url=offline``: a stand-in judge that runs here, for the CPU demo: the recording whose
    pocketsphinx transcript has the lower WER against the text (Seed-TTS-Eval's rules) wins; at equal WER,
    the one with the higher DNSMOS OVRL by at least 0.1; else a tie. Its answer has the judge's JSON shape,
    so it is parsed and aggregated like an LLM's. Not comparable with any published EmergentTTS figure."""

    name = "offline stand-in: pocketsphinx WER, then DNSMOS OVRL"

    def __init__(self):
        from s2train.judges.asr import ASRConfig, PocketSphinxASR
        from s2train.judges.quality import dnsmos_model

        self.asr, self.dnsmos = PocketSphinxASR(ASRConfig()), dnsmos_model()

    def __call__(self, prompt: Prompt, first: np.ndarray, second: np.ndarray) -> str:
        from eval import seedtts

        rules = seedtts.profile("official")
        figures = []
        for audio in (first, second):
            [heard] = self.asr([audio], ["en"])
            wer = seedtts.score_utterance("x", prompt.text, heard.text, "en", rules).wer
            ovrl = self.dnsmos(audio, 1.0)["ovrl"] if len(audio) else 1.0
            figures.append((wer, ovrl, heard.text))
        (wer_1, ovrl_1, text_1), (wer_2, ovrl_2, text_2) = figures
        if wer_1 != wer_2:
            winner = 1 if wer_1 < wer_2 else 2
        elif abs(ovrl_1 - ovrl_2) >= 0.1:
            winner = 1 if ovrl_1 > ovrl_2 else 2
        else:
            winner = 0
        grade = lambda wer: 3 if wer == 0 else 2 if wer < 0.25 else 1 if wer < 0.5 else 0  # noqa: E731
        return json.dumps(
            {
                "reasoning_system_1": f"heard {text_1!r}: WER {wer_1:.3f}, DNSMOS OVRL {ovrl_1:.2f}",
                "reasoning_system_2": f"heard {text_2!r}: WER {wer_2:.3f}, DNSMOS OVRL {ovrl_2:.2f}",
                "system_comparison": "lower WER wins; at equal WER, DNSMOS OVRL higher by 0.1 or more",
                "score_1": grade(wer_1),
                "score_2": grade(wer_2),
                "winner": winner,
            }
        )


def wav_base64(audio: np.ndarray) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1, 1), JUDGE_RATE, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def judge_request(texts: dict[str, Any], prompt: Prompt, ours: np.ndarray, e: EmergentConfig) -> dict:
    """The chat-completions body for one prompt: system, then user text, audio 1, text, audio 2."""
    if prompt.category not in texts["CATEGORY_TO_CRITERION_MAP"]:
        raise ValueError(f"the judging texts have no criterion for the category {prompt.category!r}")
    user = (
        texts["USER_MESSAGE_WIN_RATE"]
        .replace("{{{text_to_synthesize}}}", prompt.text)
        .replace("{{{text_category}}}", prompt.category)
        .replace("{{{evaluation_criterion}}}", texts["CATEGORY_TO_CRITERION_MAP"][prompt.category])
    )
    first, second = ordered(prompt, ours)
    content = [
        {"type": "text", "text": user},
        {"type": "input_audio", "input_audio": {"data": wav_base64(first), "format": "wav"}},
        {"type": "text", "text": texts["POST_AUDIO_1_MESSAGE"]},
        {"type": "input_audio", "input_audio": {"data": wav_base64(second), "format": "wav"}},
    ]
    return {
        "model": e.judge_model,
        "messages": [
            {"role": "system", "content": texts["SYSTEM_PROMPT_JUDGER"]},
            {"role": "user", "content": content},
        ],
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_tokens": e.max_tokens,
    }


def call_judge(e: EmergentConfig, body: dict) -> str:
    """POST ``body`` to ``judge_url``/chat/completions; the answer's text. Retries ``e.retries`` times."""
    if not e.judge_url:
        raise ValueError(
            "eval.emergent.judge_url is required: an OpenAI-compatible endpoint, e.g. https://host/v1"
        )
    url = e.judge_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(e.judge_api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode()
    for attempt in range(e.retries + 1):
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=e.timeout_s) as response:
                answer = json.loads(response.read())
            return answer["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as error:
            if attempt == e.retries:
                raise RuntimeError(f"the judge at {url} failed {e.retries + 1} times: {error}") from error
            time.sleep(e.retry_wait_s)
    raise AssertionError("unreachable")


def parse_answer(text: str) -> dict:
    """The judge's JSON (the first ``{...}`` of its answer, code fences allowed), with ``winner`` -1 when it
    cannot be parsed, lacks a field, or names no winner of 0, 1 or 2."""
    match = re.search(r"\{.*\}", text or "", flags=re.DOTALL)
    try:
        answer = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        answer = None
    if (
        not isinstance(answer, dict)
        or any(k not in answer for k in ANSWER_KEYS)
        or answer["winner"] not in (0, 1, 2)
    ):
        return {"winner": -1, "unparsed": (text or "")[:2000]}
    return {k: answer[k] for k in ANSWER_KEYS}


def outcome(winner: int, ours_index: int) -> float | None:
    """1 a win, 0.5 a tie, 0 a loss; None when the judgement could not be parsed."""
    if winner == -1:
        return None
    if winner == 0:
        return 0.5
    return 1.0 if winner == ours_index else 0.0


def aggregate(rows: list[dict]) -> dict:
    """Win and tie rates (in percent, 2 decimals) over the parsed judgements: overall, per category, and per
    category and evolution depth; plus the counts."""
    judged = [r for r in rows if r["score"] is not None]

    def rates(part: list[dict]) -> dict:
        if not part:
            return {"n": 0, "win_rate": None, "tie_rate": None}
        return {
            "n": len(part),
            "win_rate": round(100 * float(np.mean([r["score"] for r in part])), 2),
            "tie_rate": round(100 * float(np.mean([r["score"] == 0.5 for r in part])), 2),
        }

    by_category: dict[str, list[dict]] = defaultdict(list)
    by_depth: dict[str, list[dict]] = defaultdict(list)
    for r in judged:
        by_category[r["category"]].append(r)
        by_depth[f"{r['category']} / depth {r['depth']}"].append(r)
    return {
        **rates(judged),
        "parse_failures": len(rows) - len(judged),
        "categories": {c: rates(by_category[c]) for c in sorted(by_category)},
        "category_depths": {k: rates(by_depth[k]) for k in sorted(by_depth)},
    }


# -------------------------------------------------------------------------------------------- stage


def _our_audio(cfg: S2Config, prompts: list[Prompt], out: Path) -> tuple[Path, str]:
    """The folder of our ``<name>.wav``: ``eval.gen_dir``, or the prompts spoken through the synthesis call."""
    from s2train.inference.synthesis import Synthesizer, Utterance, speak_to_folder
    from s2train.runs import stage_input

    if cfg.eval.gen_dir:
        folder = Path(cfg.eval.gen_dir).expanduser()
        if not folder.is_dir():
            raise ValueError(f"eval.gen_dir={folder} is not a folder of emergent-<id>.wav files")
        return folder, folder.name
    s = cfg.synthesize
    model = stage_input(cfg, "pretrain", s.model)
    clip = Path(s.reference_audio).expanduser().resolve() if s.reference_audio else None
    utterances = [
        Utterance(p.name, p.text, clip, s.reference_text, seed=cfg.seed * 100_003 + p.id, literal=True)
        for p in prompts
    ]
    synth = Synthesizer.open(s, cfg.text, model, s.codec or cfg.tokenize.codec)
    speak_to_folder(synth, utterances, out / "wav", progress=cfg.eval.progress)
    return out / "wav", f"s2train ({model.name})"


def run(cfg: S2Config) -> dict:
    e = cfg.eval.emergent
    if not e.judge_url:
        raise ValueError(
            "eval.emergent.judge_url is required: an OpenAI-compatible endpoint (e.g. https://host/v1), or "
            "offline for the demo's stand-in judge"
        )
    offline = OfflineJudge() if e.judge_url == OFFLINE else None
    texts = read_judge_texts(e.prompts) if offline is None else None
    prompts = load_prompts(e)
    if texts is not None:
        missing = sorted({p.category for p in prompts} - set(texts["CATEGORY_TO_CRITERION_MAP"]))
        if missing:
            raise ValueError(f"{e.prompts} has no criterion for the categories {missing}")
    out = Path(cfg.run_dir)
    wav_dir, system = _our_audio(cfg, prompts, out)
    done_file = out / "judgements.jsonl"
    done = {row["id"]: row for row in read_appended(done_file)}  # a line a kill cut short is judged again
    from tqdm import tqdm

    for prompt in tqdm(prompts, desc="emergent judge", unit="prompt", disable=not cfg.eval.progress):
        if prompt.id in done:
            continue
        wav = wav_dir / f"{prompt.name}.wav"
        if not wav.is_file():
            raise ValueError(f"no audio {wav} for prompt {prompt.id}")
        ours = _audio(wav, str(wav))
        if offline is not None:
            answer = parse_answer(offline(prompt, *ordered(prompt, ours)))
        else:
            answer = parse_answer(call_judge(e, judge_request(texts, prompt, ours, e)))
        ours_index = 2 if baseline_first(prompt.id) else 1
        row = {
            "id": prompt.id,
            "category": prompt.category,
            "depth": prompt.depth,
            "ours_index": ours_index,
            "score": outcome(answer["winner"], ours_index),
            **answer,
        }
        append_jsonl(done_file, row)  # one line a judgement, as it comes
        done[prompt.id] = row
    rows = [done[p.id] for p in prompts]
    summary = aggregate(rows)
    result = {
        "system": system,
        "baseline": "the dataset's audio",
        "judge": (
            {"url": OFFLINE, "model": OfflineJudge.name, "temperature": 0.0, "top_p": None}
            if offline is not None
            else {"url": e.judge_url, "model": e.judge_model, "temperature": e.temperature, "top_p": e.top_p}
        ),
        "comparable_with_published": offline is None,
        "prompts": len(prompts),
        **summary,
    }
    write_json_atomic(out / "results.json", result)
    write_text_atomic(out / "report.md", report_markdown(result))
    return result


def report_markdown(result: dict) -> str:
    lines = [
        f"# EmergentTTS-Eval: {result['system']} against the baseline",
        "",
        f"Judge: `{result['judge']['model']}` at {result['judge']['url']} (temperature {result['judge']['temperature']}). "
        f"{result['prompts']} prompts, {result['parse_failures']} judgements that could not be parsed (left out). "
        "A win counts 1, a tie 0.5; above 50 the system is preferred to the baseline."
        + (
            ""
            if result["comparable_with_published"]
            else " **Not comparable with published figures**: a stand-in judge."
        ),
        "",
        "| category | prompts judged | win rate (%) | tie rate (%) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in result["categories"].items():
        lines.append(f"| {name} | {r['n']} | {r['win_rate']} | {r['tie_rate']} |")
    lines.append(f"| **all** | **{result['n']}** | **{result['win_rate']}** | **{result['tie_rate']}** |")
    lines += [
        "",
        "| category / evolution depth | prompts judged | win rate (%) | tie rate (%) |",
        "|---|---:|---:|---:|",
    ]
    for name, r in result["category_depths"].items():
        lines.append(f"| {name} | {r['n']} | {r['win_rate']} | {r['tie_rate']} |")
    return "\n".join(lines) + "\n"
