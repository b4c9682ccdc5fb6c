"""``experiment=demo`` chains every stage on the demo corpus: the codec trained on the clean shards,
the clean shards tokenized with that codec, and the tiny Dual-AR model pretrained on those tokens
(``demo_root`` runs it once per session, with short trainings)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from eval.demo_report import DemoReportConfig, _chosen_ceiling, _gap_interval, _pace_captions
from s2train.checkpoints import load_codec
from s2train.shards import read_tar
from s2train.training.codec_data import index_shards, read_metadata, split_heldout
from tests.conftest import compose_config, read_jsonl


def _results(demo_root, stage: str) -> dict:
    return json.loads((demo_root / "demo" / stage / "results.json").read_text())


def test_demo_codec_reports_heldout_mel_distance_wer_and_codebook_usage(demo_root):
    codec = _results(demo_root, "codec")
    assert codec["steps"] == 16 and codec["heldout_utterances"] == 12  # experiment=demo's heldout_items
    assert np.isfinite(codec["heldout_mel_distance"]) and codec["heldout_mel_distance"] > 0
    assert codec["wer_asr"] == "pocketsphinx" and codec["wer_utterances"] >= 1  # English held-out ones
    # the held-out split's English utterances with a transcript of their own are the ones scored
    clean = demo_root / "demo" / "clean" / "shards"
    _, heldout = split_heldout(index_shards(clean), codec["heldout_utterances"])
    metas = [read_metadata(u) for u in heldout]
    given = [m for m in metas if m["lang"] == "en" and m["text"] and m["text_source"] == "given"]
    assert given and codec["wer_transcripts"] == "given" and codec["wer_utterances"] == len(given)
    assert codec["wer_delta"] == round(codec["wer_reconstruction"] - codec["wer_original"], 2)
    assert len(codec["codebook_perplexity"]) == len(codec["heldout_codebook_usage"]) == 8
    previews = demo_root / "demo" / "codec" / "previews" / "step-000016"
    assert (previews / "mel.png").is_file() and len(list(previews.glob("*.wav"))) == 12


def test_demo_tokens_come_from_the_demo_codec(demo_root):
    tokenize = _results(demo_root, "tokenize")
    codec = load_codec(demo_root / "demo" / "codec" / "codec.pt")
    assert tokenize["complete"] and tokenize["codebooks"] == codec.config.n_codebooks == 8
    assert tokenize["codebook_sizes"] == [256] * 8
    assert tokenize["frame_rate"] == codec.frame_rate == 50
    manifest = read_jsonl(demo_root / "demo" / "tokenize" / "manifest.jsonl")
    clean = read_jsonl(demo_root / "demo" / "clean" / "manifest.jsonl")
    assert sorted(m["id"] for m in manifest) == sorted(m["id"] for m in clean)
    shard = next((demo_root / "demo" / "tokenize" / "shards").glob("*.tar"))
    for members in read_tar(shard).values():
        meta = json.loads(members["json"])
        assert meta["codec"] == "codec" and abs(meta["frames"] - meta["duration"] * 50) <= 1


def test_demo_pretraining_trains_on_the_demo_tokens(demo_root):
    pretrain = _results(demo_root, "pretrain")
    assert pretrain["steps"] == 12
    assert pretrain["final_loss"] < pretrain["first_loss"]
    # model=demo is shaped for the demo codec and tokenizer; the demo trains on 2 of the codec's 8 codebooks
    assert pretrain["model_changes"] == {"num_codebooks": [8, 2]}
    assert (demo_root / "demo" / "pretrain" / "loss_curve.png").is_file()
    pipeline = _results(demo_root, "pipeline")
    assert pipeline["stages"] == (
        "demo_corpus -> clean -> codec -> tokenize -> pretrain -> sft -> synthesize -> eval -> demo_report"
        " -> finetune -> preference -> grpo"
    )


def test_demo_sft_tunes_the_pretrained_model(demo_root):
    sft = _results(demo_root, "sft")
    assert sft["steps"] == 6 and sft["init"] == str(demo_root / "demo" / "pretrain")
    assert (demo_root / "demo" / "sft" / "model.safetensors").is_file()


def test_demo_sentence_files_are_kept_with_their_transcripts(demo_root, truth):
    segments: dict[str, list[dict]] = {}
    for m in read_jsonl(demo_root / "demo" / "clean" / "manifest.jsonl"):
        segments.setdefault(m["source"], []).append(m)
    files = [name for name, row in truth.items() if row["kind"] == "sentence"]
    # four voices, three sentences each in the shortened demo; then each sentence fast and slow in one
    # voice, the voices in turn: the same voice says the same words at three paces
    assert len(files) == 4 * 3 + 3 * 2
    said: dict[tuple[str, str], set[float]] = {}
    for name in files:
        row = truth[name]["sentences"][0]
        said.setdefault((row["speaker"], row["text"]), set()).add(row["stretch"])
    assert sorted(said.values(), key=len)[-3:] == [{0.6, 1.0, 1.8}] * 3
    assert sorted(v for (v, _), paces in said.items() if len(paces) == 3) == ["awb", "rms", "slt"]
    # one segment each, with the transcript the corpus knows (the speaker-change check may still cut a
    # slowed-down flite sentence in two, whose parts then carry the ASR's words)
    whole = [name for name in files if len(segments.get(name, [])) == 1]
    assert len(whole) >= 0.75 * len(files)
    for name in whole:
        assert segments[name][0]["text"] == truth[name]["sentences"][0]["text"]
        assert segments[name][0]["text_source"] == "given"
    # the recordings come without transcripts: their text is the ASR's, and says so
    recordings = [m for name, rows in segments.items() if name not in files for m in rows if m["text"]]
    assert recordings and all(m["text_source"] == "asr" and m["text"] == m["asr_text"] for m in recordings)


def test_demo_report_measures_the_demo_model(demo_root, truth):
    report = _results(demo_root, "demo_report")
    assert report["model"] == str(demo_root / "demo" / "sft") and len(report["voices"]) == 4
    for key in (
        "wer_seen",
        "wer_seen_plain",
        "wer_seen_codec",
        "wer_seen_codec_all",
        "wer_seen_files",
        "wer_heldout",
    ):
        assert report[key] >= 0
    assert report["model_codebooks"] == 2 and report["codec_codebooks"] == 8
    assert report["wer_seen_files"] < 50  # the flite files themselves are intelligible
    assert -1 <= report["sim_other_voices"] <= 1 and -1 <= report["sim_own_voice"] <= 1
    # each caption text asks in the captions of its recordings at other paces, each at both paces
    paced = {
        t["sentences"][0]["text"]: t["speaker"]
        for t in truth.values()
        if t["kind"] == "sentence" and t["sentences"][0]["stretch"] != 1
    }
    assert report["captions"]
    for text, asked in report["captions"].items():
        assert asked["voice"] == paced[text] and asked["captions"]
        for pair in asked["captions"]:
            assert pair["slow"].replace("slow", "fast", 1) == pair["fast"]
    for key in ("wer_seen_above_codec", "wer_seen_plain_above_codec"):  # intervals over the seen texts
        low, high = report[f"{key}_ci95"]
        assert low <= report[key] <= high
    if "rate_slow_minus_fast" in report:  # both captions' speech long enough to measure for some text
        low, high = report["rate_slow_minus_fast_ci95"]
        assert low <= report["rate_slow_minus_fast"] <= high
    rows = read_jsonl(demo_root / "demo" / "demo_report" / "utterances.jsonl")
    assert {r["group"] for r in rows} == {"seen", "seen_plain", "heldout", "caption_slow", "caption_fast"}
    assert all(r["voice"] is None for r in rows if r["group"] == "seen_plain")
    # each plain utterance is heard in one of the voices, and its ceiling is that voice's file
    plain = [r for r in rows if r["group"] == "seen_plain"]
    if all(r.get("heard_voice") for r in plain):
        assert {r["heard_voice"] for r in plain} <= set(report["voices"])
        assert report["wer_seen_codec_chosen_voice"] >= 0
        low, high = report["wer_seen_plain_above_chosen_ci95"]
        assert low <= report["wer_seen_plain_above_chosen"] <= high
        gap = report["wer_seen_plain"] - report["wer_seen_codec_chosen_voice"]
        assert report["wer_seen_plain_above_chosen"] == pytest.approx(gap, abs=0.011)
    assert "| WER, held-out sentences |" in (demo_root / "demo" / "demo_report" / "report.md").read_text()


def test_a_pace_caption_asks_for_each_pace_and_must_say_where_it_goes(demo_root, truth):
    cfg = compose_config("experiment=demo", f"run_root={demo_root}")
    cfg.demo_report = DemoReportConfig(rate_caption="A speaker at a {pace} pace.")
    assert _pace_captions(cfg, "awb")["captions"] == [
        {"slow": "A speaker at a slow pace.", "fast": "A speaker at a fast pace."}
    ]
    cfg.demo_report = DemoReportConfig()  # default: the captions the captioner wrote
    clean = {m["source"]: m for m in read_jsonl(demo_root / "demo" / "clean" / "manifest.jsonl")}
    twins = [
        name for name, t in truth.items() if t["kind"] == "sentence" and t["sentences"][0]["stretch"] != 1
    ]
    named = [
        name
        for name in twins
        if re.search(r"\b(slow|fast|moderate) (pace|delivery)", clean.get(name, {}).get("caption") or "")
    ]
    asked = _pace_captions(cfg, "awb", twins)
    assert asked["own"] == bool(named) and len(asked["captions"]) == max(1, len(named))
    for pair in asked["captions"]:  # each pair differs in its pace word alone
        assert pair["slow"] != pair["fast"] and pair["slow"] == pair["fast"].replace("fast", "slow", 1)
    assert not _pace_captions(cfg, "awb", [])["own"]  # no recording at another pace: the voice's caption
    with pytest.raises(ValueError, match="where the pace goes"):
        DemoReportConfig(rate_caption="A speaker at a slow pace.")


def test_demo_trains_a_preference_model_and_aligns_the_sft_model_with_grpo(demo_root):
    preference = _results(demo_root, "preference")
    assert preference["steps"] == 60 and preference["heldout_pairs"] >= 4
    assert 0 <= preference["heldout_accuracy"] <= 1
    grpo = _results(demo_root, "grpo")
    assert grpo["steps"] == 2 and grpo["init"] == str(demo_root / "demo" / "sft")
    assert grpo["rewards"] == {"dnsmos": 1.0, "sim": 0.5} and grpo["heldout_judge"] == "wer"
    assert grpo["heldout_evaluations"] == 2 and len(grpo["heldout_reward_change_ci95"]) == 2
    rows = read_jsonl(demo_root / "demo" / "grpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0 <= row["reward/dnsmos"] <= 1 and row["logprob_gap"] < 1e-4
        assert row["rollout_s"] > 0 and row["score_s"] > 0 and row["update_s"] > 0
    assert (demo_root / "demo" / "grpo" / "reward_curve.png").is_file()


def test_a_plain_utterance_is_held_to_the_file_of_the_voice_it_chose():
    text = "one two three four"
    truth_rows = [
        {"voice": "a", "text": text, "hyp_codec": "one two three four"},  # heard perfectly through the codec
        {"voice": "b", "text": text, "hyp_codec": "one"},  # three words of four lost
    ]
    rows = {
        "p0": {"group": "seen_plain", "text": text, "hyp": "one two three", "heard_voice": "a"},
        "p1": {"group": "seen_plain", "text": text, "hyp": "one two three", "heard_voice": "a"},
    }
    chosen = _chosen_ceiling(rows, truth_rows)
    assert [x["voice"] for x in chosen] == ["a", "a"]
    # one word in four lost against none in the voice it chose: 25 points above its ceiling, and no
    # interval can move that with one text; against both voices' files (37.5) it would look 12.5 below
    assert _gap_interval(rows, "seen_plain", truth_rows, [text], seed=0, chosen_voice=True) == [25.0, 25.0]
    assert _gap_interval(rows, "seen_plain", truth_rows, [text], seed=0) == [-12.5, -12.5]
    rows["p1"]["heard_voice"] = None  # too short to embed: no chosen ceiling at all
    assert _chosen_ceiling(rows, truth_rows) == []
