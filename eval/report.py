"""The evaluation report: per-utterance CSV, a Markdown table beside other systems' published figures
(each row citing its source) and a bar chart."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml

from s2train.runs import atomic_path, write_text_atomic

PUBLISHED = Path(__file__).parent / "published_seedtts.yaml"
SET_KEYS = {"test-en": "test_en", "test-zh": "test_zh", "test-hard": "test_hard"}


def published_rows(test_set: str, path: str | Path | None = None) -> list[dict]:
    """``[{name, wer, sim, source, url, note}]`` of the systems that published figures on ``test_set``."""
    path = Path(path) if path else PUBLISHED
    if not path.is_file():
        raise ValueError(f"eval.published={path} is not a file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    rows = []
    for system in data.get("systems", []):
        figures = system.get(SET_KEYS[test_set]) or {}
        if figures.get("wer") is None and figures.get("sim") is None:
            continue
        rows.append(
            {
                "name": system["name"],
                "wer": figures.get("wer"),
                "sim": figures.get("sim"),
                "source": system.get("source", ""),
                "url": system.get("url") or "",
                "note": system.get("note") or "",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        write_text_atomic(path, "")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def _cell(value):
    if isinstance(value, dict):
        return ";".join(f"{k}={v}" for k, v in value.items())
    return value


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict, published: list[dict]) -> str:
    """Our rows (the system under test and, when scored, the ground truth), then the published ones."""
    test_set, protocol = results["test_set"], results["protocol"]
    lines = [
        f"# Seed-TTS-Eval: {results['meta_name']} ({test_set} rules, profile `{results['profile']}`)",
        "",
        f"Protocol: {protocol}. WER is the mean of per-utterance WER in percent"
        + (" (the official figure)" if results["profile"] != "f5" else " (F5-TTS's averaging)")
        + f"; SIM is the mean cosine of {results['sim_model'] or 'no SIM model'}.",
        "",
        "| system | utterances | skipped | WER % | SIM | DNSMOS OVRL | corpus WER % (not official) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["systems"].items():
        lines.append(
            f"| {name} | {row['utterances']} | {row['skipped']} | {_fmt(row.get('wer'), 3)} | "
            f"{_fmt(row.get('sim'), 3)} | {_fmt(row.get('dnsmos_ovrl'), 3)} | "
            f"{_fmt(row.get('corpus_wer_not_official'), 3)} |"
        )
    lines += ["", f"## Published figures on {test_set}", ""]
    if not results["comparable"]:
        lines += [
            f"This run's figures are **not comparable** with these: {results['comparable_reason']}.",
            "",
        ]
    lines += ["| system | WER % | SIM | source |", "|---|---:|---:|---|"]
    for row in published:
        source = f"[{row['source']}]({row['url']})" if row["url"] else row["source"]
        lines.append(f"| {row['name']} | {_fmt(row['wer'], 3)} | {_fmt(row['sim'], 3)} | {source} |")
    notes = [f"- **{row['name']}**: {' '.join(row['note'].split())}" for row in published if row["note"]]
    if notes:
        lines += ["", "Notes on the published rows:", "", *notes]
    return "\n".join(lines) + "\n"


def bar_chart(path: Path, results: dict, published: list[dict]) -> None:
    """WER and SIM side by side: this run's systems highlighted, the published ones in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [(name, row.get("wer"), row.get("sim")) for name, row in results["systems"].items()]
    others = [(row["name"], row["wer"], row["sim"]) for row in published]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * (len(ours) + len(others)) + 1.8))
    for ax, column, title in (
        (axes[0], 1, "WER % (lower is better)"),
        (axes[1], 2, "SIM (higher is better)"),
    ):
        entries = [(n, v, True) for n, *vals in ours for v in [vals[column - 1]] if v is not None]
        entries += [(n, v, False) for n, *vals in others for v in [vals[column - 1]] if v is not None]
        names = [n for n, _, _ in entries]
        values = [v for _, v, _ in entries]
        colors = ["tab:orange" if mine else "tab:gray" for _, _, mine in entries]
        ax.barh(range(len(entries)), values, color=colors)
        ax.set_yticks(range(len(entries)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    note = "" if results["comparable"] else "  (this run: not comparable with the published rows)"
    fig.suptitle(f"Seed-TTS-Eval {results['test_set']}, profile {results['profile']}{note}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
