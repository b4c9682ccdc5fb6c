"""EmergentTTS-Eval: the judge's request and order, answer parsing, win-rate aggregation against hand-computed
values, reading the judging texts without running their file, and a whole run against a stand-in judge
endpoint on loopback (resumed after a failing judge)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eval.emergent import (
    EmergentConfig,
    aggregate,
    baseline_first,
    load_prompts,
    outcome,
    parse_answer,
    read_judge_texts,
)
from tests.conftest import run_cli

# Our own stand-in judging texts, shaped like upstream's prompts.py (a class of literal constants).
JUDGE_TEXTS = """
import pathlib
pathlib.Path(__file__).with_name("ran").write_text("the file was run")


class Texts:
    SYSTEM_PROMPT_JUDGER = "You compare two recordings."
    USER_MESSAGE_WIN_RATE = "Text: {{{text_to_synthesize}}}. Category: {{{text_category}}}. {{{evaluation_criterion}}}"
    POST_AUDIO_1_MESSAGE = "That was the first; the second follows."
    CATEGORY_TO_CRITERION_MAP = {"Emotions": "Judge the feeling.", "Questions": "Judge the rising tone.",
                                 "Pronunciation": "Judge the sounds."}
    UNRELATED = [1, 2, 3]
"""


def answer(winner) -> str:
    body = {k: "because" for k in ("reasoning_system_1", "reasoning_system_2", "system_comparison")}
    return "```json\n" + json.dumps({**body, "score_1": 2, "score_2": 1, "winner": winner}) + "\n```"


def test_the_answer_is_parsed_and_a_bad_one_is_a_parse_failure():
    assert parse_answer(answer(2))["winner"] == 2
    assert parse_answer("Here you go: " + answer(0) + " done")["winner"] == 0
    assert parse_answer(answer(3))["winner"] == -1  # not a winner
    assert parse_answer('{"winner": 1}')["winner"] == -1  # fields missing
    assert parse_answer("I prefer the first one.")["winner"] == -1
    assert [outcome(w, 2) for w in (2, 1, 0, -1)] == [1.0, 0.0, 0.5, None]


def test_the_order_is_drawn_once_per_prompt_from_its_id():
    draws = [baseline_first(i) for i in range(200)]
    assert draws == [baseline_first(i) for i in range(200)]  # the same order for every system
    assert 70 < sum(draws) < 130  # both orders, about half each
    assert draws[:4] == [np.random.default_rng(i).random() > 0.5 for i in range(4)]


def test_win_rates_are_hand_computed_means_with_ties_as_half_and_failures_left_out():
    rows = [
        {"category": "Emotions", "depth": 0, "score": 1.0},
        {"category": "Emotions", "depth": 1, "score": 0.0},
        {"category": "Emotions", "depth": 1, "score": 0.5},
        {"category": "Questions", "depth": 0, "score": 1.0},
        {"category": "Questions", "depth": 0, "score": None},  # could not be parsed
        {"category": "Questions", "depth": 2, "score": 0.5},
        {"category": "Questions", "depth": 2, "score": 1.0},
    ]
    result = aggregate(rows)
    # all: (1 + 0 + 0.5 + 1 + 0.5 + 1) / 6 = 4 / 6; ties 2 / 6; prompts weigh the same (not the categories)
    assert (result["n"], result["win_rate"], result["tie_rate"], result["parse_failures"]) == (
        6,
        66.67,
        33.33,
        1,
    )
    assert result["categories"]["Emotions"] == {"n": 3, "win_rate": 50.0, "tie_rate": 33.33}
    assert result["categories"]["Questions"] == {"n": 3, "win_rate": 83.33, "tie_rate": 33.33}
    assert result["category_depths"]["Emotions / depth 1"] == {"n": 2, "win_rate": 25.0, "tie_rate": 50.0}
    assert result["category_depths"]["Questions / depth 2"] == {"n": 2, "win_rate": 75.0, "tie_rate": 50.0}


def test_the_judging_texts_are_read_from_the_file_without_running_it(tmp_path):
    file = tmp_path / "prompts.py"
    file.write_text(JUDGE_TEXTS)
    texts = read_judge_texts(file)
    assert texts["POST_AUDIO_1_MESSAGE"] == "That was the first; the second follows."
    assert set(texts["CATEGORY_TO_CRITERION_MAP"]) == {"Emotions", "Questions", "Pronunciation"}
    assert not (tmp_path / "ran").exists(), "nothing in the file may run"
    (tmp_path / "computed.py").write_text('SYSTEM_PROMPT_JUDGER = open("/etc/passwd").read()\n')
    with pytest.raises(ValueError, match="not a literal"):
        read_judge_texts(tmp_path / "computed.py")
    (tmp_path / "partial.py").write_text('SYSTEM_PROMPT_JUDGER = "x"\n')
    with pytest.raises(ValueError, match="lacks USER_MESSAGE_WIN_RATE"):
        read_judge_texts(tmp_path / "partial.py")
    with pytest.raises(ValueError, match="prompts is required"):
        read_judge_texts(None)


# ----------------------------------------------------------------------------------- a whole run

RATE = 24000
# id, category, depth, text, our loudness against the baseline's 0.1 (the stand-in prefers the louder)
PROMPTS = [
    (0, "Emotions", 0, "I can't believe you did this!", 0.2),  # win
    (1, "Emotions", 1, "Oh, how lovely to see you.", 0.05),  # loss
    (2, "Questions", 0, "Are you coming tonight?", 0.2),  # win
    (3, "Questions", 2, "Did she really say that?", 0.2),  # win
    (4, "Questions", 2, "Why not?", 0.1),  # tie
    (5, "Pronunciation", 0, "GARBAGE answer, please.", 0.2),  # the judge answers nonsense: left out
    (6, "Foreign Words", 0, "Filtered out by category.", 0.2),
]


def tone(level: float, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (level * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


class StandInJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that prefers the louder recording (1 or 2; 0 when equal)."""

    requests: list[dict] = []
    fail_on: set[str] = set()

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandInJudge.requests.append({**body, "path": self.path, "auth": self.headers.get("Authorization")})
        parts = body["messages"][1]["content"]
        text = parts[0]["text"]
        if any(marker in text for marker in StandInJudge.fail_on):
            self.send_response(500)
            self.end_headers()
            return
        levels = []
        for part in (parts[1], parts[3]):
            audio, _ = sf.read(io.BytesIO(base64.b64decode(part["input_audio"]["data"])))
            levels.append(float(np.sqrt(np.mean(audio**2))))
        winner = 0 if abs(levels[0] - levels[1]) < 0.01 * max(levels) else (1 if levels[0] > levels[1] else 2)
        content = "no idea" if "GARBAGE" in text else answer(winner)
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StandInJudge.requests, StandInJudge.fail_on = [], set()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def make_data(tmp_path: Path) -> tuple[Path, Path]:
    from datasets import Dataset

    rows = {
        "category": [p[1] for p in PROMPTS],
        "evolution_depth": [p[2] for p in PROMPTS],
        "text_to_synthesize": [p[3] for p in PROMPTS],
        "language": ["en"] * len(PROMPTS),
        "audio": [{"array": tone(0.1).tolist(), "sampling_rate": RATE} for _ in PROMPTS],
    }
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "dataset"))
    ours = tmp_path / "ours"
    ours.mkdir()
    for i, _, _, _, level in PROMPTS:
        sf.write(ours / f"emergent-{i:05d}.wav", tone(level), RATE)
    return tmp_path / "dataset", ours


def test_a_whole_run_against_a_stand_in_judge_resumes_after_a_failing_judge(tmp_path, judge, monkeypatch):
    data, ours = make_data(tmp_path)
    (tmp_path / "prompts.py").write_text(JUDGE_TEXTS)
    run_dir = tmp_path / "eval"
    args = [
        "stage=emergent",
        f"run_dir={run_dir}",
        f"eval.gen_dir={ours}",
        f"eval.emergent.data={data}",
        f"eval.emergent.prompts={tmp_path / 'prompts.py'}",
        f"eval.emergent.judge_url={judge}",
        "eval.emergent.judge_model=stand-in",
        "eval.emergent.categories=[Emotions,Questions,Pronunciation]",
        "eval.emergent.retries=1",
        "eval.emergent.retry_wait_s=0",
        "eval.progress=false",
    ]
    StandInJudge.fail_on = {"Did she really"}  # prompt 3's judge call fails, twice
    failed = run_cli(*args, check=False)
    assert failed.returncode != 0 and "failed 2 times" in failed.stderr
    judged = [json.loads(line)["id"] for line in (run_dir / "judgements.jsonl").read_text().splitlines()]
    assert judged == [0, 1, 2]
    with (run_dir / "judgements.jsonl").open("a") as f:  # a judgement a kill cut short: judged again
        f.write('{"id": 3, "category": "Quest')
    StandInJudge.requests, StandInJudge.fail_on = [], set()
    monkeypatch.setenv("EMERGENT_JUDGE_API_KEY", "secret")
    run_cli(*args)
    sent = StandInJudge.requests
    assert len(sent) == 3, "a rerun judges only the prompts without a judgement"
    assert {r["path"] for r in sent} == {"/v1/chat/completions"} and sent[0]["auth"] == "Bearer secret"
    first = sent[0]  # prompt 3
    assert first["model"] == "stand-in" and first["messages"][0]["content"] == "You compare two recordings."
    assert first["messages"][1]["content"][0]["text"] == (
        "Text: Did she really say that?. Category: Questions. Judge the rising tone."
    )
    assert first["messages"][1]["content"][2]["text"] == "That was the first; the second follows."
    clip, rate = sf.read(
        io.BytesIO(base64.b64decode(first["messages"][1]["content"][1]["input_audio"]["data"]))
    )
    assert rate == 16000
    louder_first = np.sqrt(np.mean(clip**2)) > 0.1
    assert louder_first != baseline_first(3)  # ours (the louder) is first exactly when the baseline is not
    result = json.loads((run_dir / "results.json").read_text())
    # scores 1, 0, 1, 1, 0.5 and one parse failure: (1 + 0 + 1 + 1 + 0.5) / 5
    assert (result["prompts"], result["n"], result["parse_failures"]) == (6, 5, 1)
    assert (result["win_rate"], result["tie_rate"]) == (70.0, 20.0)
    assert result["categories"]["Emotions"] == {"n": 2, "win_rate": 50.0, "tie_rate": 0.0}
    assert result["categories"]["Questions"] == {"n": 3, "win_rate": 83.33, "tie_rate": 33.33}
    assert "Pronunciation" not in result["categories"]
    report = (run_dir / "report.md").read_text()
    assert "| **all** | **5** | **70.0** | **20.0** |" in report


def test_the_jsonl_layout_reads_its_baseline_audios(tmp_path):
    rows = [
        {"category": "Questions", "text_to_synthesize": f"Question {i}?", "evolution_depth": i}
        for i in range(3)
    ]
    (tmp_path / "emergent_tts_eval_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "baseline_audios").mkdir()
    for i in range(3):
        sf.write(tmp_path / "baseline_audios" / f"{i}.wav", tone(0.1 * (i + 1)), RATE)
    prompts = load_prompts(EmergentConfig(data=str(tmp_path / "emergent_tts_eval_data.jsonl"), depths=[0, 2]))
    assert [(p.id, p.depth, p.name) for p in prompts] == [(0, 0, "emergent-00000"), (2, 2, "emergent-00002")]
    assert abs(np.sqrt(np.mean(prompts[1].baseline ** 2)) - 0.3 / np.sqrt(2)) < 0.01  # resampled to 16 kHz
    (tmp_path / "baseline_audios" / "2.wav").unlink()
    with pytest.raises(ValueError, match="no baseline audio"):
        load_prompts(EmergentConfig(data=str(tmp_path / "emergent_tts_eval_data.jsonl")))


def test_the_demo_model_meets_the_flite_ground_truth_before_the_offline_judge(demo_root):
    """The README's demo command: the demo's held-out sentences, its SFT model against the flite ground
    truth, judged by the offline stand-in; the report sits beside eval's, labelled as not comparable."""
    run_cli("experiment=demo", "stage=emergent", f"run_root={demo_root}", "synthesize.max_new_tokens=60")
    out = demo_root / "demo" / "emergent"
    result = json.loads((out / "results.json").read_text())
    assert result["prompts"] == 6 and result["n"] + result["parse_failures"] == 6 and result["n"] >= 1
    assert result["judge"]["url"] == "offline" and result["comparable_with_published"] is False
    assert 0 <= result["win_rate"] <= 100 and list(result["categories"]) == ["Demo sentences"]
    rows = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    for row in rows:  # the stand-in's verdict follows its own figures: the lower WER wins
        wers = [
            float(row[f"reasoning_system_{i}"].split("WER ")[1].split(":")[0].split(",")[0]) for i in (1, 2)
        ]
        if wers[0] != wers[1]:
            assert row["winner"] == (1 if wers[0] < wers[1] else 2), row
    assert "Not comparable with published figures" in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "wav").glob("*.wav")) == [f"emergent-{i:05d}.wav" for i in range(6)]
