"""Seed-TTS-Eval meta lists: ``utt|prompt_text|prompt_wav|target_text[|gt_wav]`` a line.

Relative paths are relative to the list's folder, and every clip a list names, links resolved, must lie
inside the folders the user allowed (by default the list's own folder): a list cannot make the harness
read ``../../etc/shadow``. The audio under test is ``<gen_dir>/<utt>.wav``; an
utterance without that file is skipped and counted, as the official scripts skip it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MetaItem:
    utt: str
    prompt_text: str
    prompt_wav: Path
    target_text: str
    gt_wav: Path | None = None


def read_meta(path: str | Path, allowed: list[Path] | None = None) -> list[MetaItem]:
    """The items of a meta list; ``allowed``: the folders its clips may lie in (default: its folder)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"eval.meta={path} is not a file (a Seed-TTS-Eval meta.lst)")
    base = path.resolve().parent
    allowed = [Path(a).expanduser().resolve() for a in allowed] if allowed else [base]

    def clip(name: str, line_no: int) -> Path:
        resolved = (base / name).resolve()
        if not any(resolved.is_relative_to(folder) for folder in allowed):
            raise ValueError(
                f"{path.name} line {line_no} names {name!r}, which resolves to {resolved}, outside the "
                f"allowed folders {[str(a) for a in allowed]}; add its folder to eval.audio_dirs"
            )
        return resolved

    items, seen = [], set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        fields = line.split("|")
        if len(fields) not in (4, 5):
            raise ValueError(
                f"{path.name} line {line_no} has {len(fields)} '|'-separated fields; a meta list line is "
                "utt|prompt_text|prompt_wav|target_text[|gt_wav]"
            )
        utt = fields[0]
        if not utt or "/" in utt or utt in (".", ".."):
            raise ValueError(f"{path.name} line {line_no}: {utt!r} cannot name a file")
        if utt in seen:
            raise ValueError(f"{path.name} line {line_no}: utterance {utt!r} is listed twice")
        seen.add(utt)
        gt = clip(fields[4], line_no) if len(fields) == 5 and fields[4] else None
        items.append(MetaItem(utt, fields[1], clip(fields[2], line_no), fields[3], gt))
    if not items:
        raise ValueError(f"{path} lists no utterance")
    return items


def present(items: list[MetaItem], gen_dir: Path) -> tuple[list[MetaItem], list[str]]:
    """The items whose ``<gen_dir>/<utt>.wav`` exists, and the utterances skipped for want of one."""
    found = [item for item in items if (gen_dir / f"{item.utt}.wav").is_file()]
    names = {item.utt for item in found}
    return found, [item.utt for item in items if item.utt not in names]
