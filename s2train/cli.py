"""Dispatch of ``python -m s2train``: validate the config, prepare the run directory, run, summarise.

Also the ``pipeline`` stage, which runs several stages in order (``experiment=demo`` uses it).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from s2train.runs import prepare_run_dir, stage_run_dir, write_json_atomic
from s2train.stages import STAGES, stage_runner

if TYPE_CHECKING:
    from s2train.config import S2Config


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=list)  # run in this order, each in run_root/name/<stage>


def dispatch(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "stage"):
        known = ", ".join(sorted(STAGES))
        print(
            f"error: choose a stage, e.g. `python -m s2train stage=clean`, or an experiment such as "
            f"`python -m s2train experiment=demo`. Known stages: {known}",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        typed: S2Config = OmegaConf.to_object(cfg)  # runs every __post_init__ check
        unknown = unknown_keys(cfg, typed)
        if unknown:  # `+section.key=...` adds a key the schema does not have; it would be ignored
            raise ValueError(
                f"unknown config keys {unknown}: check their spelling (the schema has no such key)"
            )
        return run_stage(typed)
    except ValueError as error:  # a user error, worded for a user
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def unknown_keys(node: DictConfig, typed: Any, prefix: str = "") -> list[str]:
    """Keys of the composed config that the typed config has no field for (dict-valued fields, such as
    loss weights, take any key)."""
    out = []
    fields = {f.name for f in dataclasses.fields(typed)}
    for key in node.keys():
        if str(key) not in fields:
            out.append(f"{prefix}{key}")
            continue
        value = getattr(typed, str(key))
        if dataclasses.is_dataclass(value) and isinstance(node[key], DictConfig):
            out += unknown_keys(node[key], value, f"{prefix}{key}.")
    return out


def run_stage(cfg: S2Config) -> dict:
    """Run ``cfg.stage`` in its run directory and print its summary table."""
    runner = stage_runner(cfg.stage)
    cfg = dataclasses.replace(cfg, run_dir=str(stage_run_dir(cfg)))
    recorded = prepare_run_dir(cfg)
    started = time.perf_counter()
    try:
        results = runner(cfg)
    except ValueError:  # a user error: this call made nothing its records could describe
        for path in recorded:
            path.unlink(missing_ok=True)
        raise
    if results is None:  # another rank of a distributed stage: rank 0 writes the results
        return {}
    results = {"stage": cfg.stage, "run_dir": cfg.run_dir, **results}
    results["wall_s"] = round(time.perf_counter() - started, 2)
    write_json_atomic(Path(cfg.run_dir) / "results.json", results)
    print(summary_table(results))
    return results


def summary_table(results: dict[str, Any]) -> str:
    """A two-column table of a stage's headline figures (nested dicts are left to results.json)."""
    rows = [(k, _fmt(v)) for k, v in results.items() if not isinstance(v, dict | list)]
    rows = [(k, v if len(v) <= 72 else v[:71] + "…") for k, v in rows]  # results.json has them whole
    width = max(len(k) for k, _ in rows)
    value_width = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (value_width + 2) + "+"
    title = f"| {'stage ' + str(results.get('stage', '')):<{width + value_width + 3}} |"
    body = [f"| {k:<{width}} | {v:>{value_width}} |" for k, v in rows]
    return "\n".join([line, title, line, *body, line])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def run(cfg: S2Config) -> dict:
    """The ``pipeline`` stage: run ``pipeline.stages`` in order, each in ``run_root/name/<stage>``."""
    if not cfg.pipeline.stages:
        raise ValueError("pipeline.stages is empty: name the stages to run, e.g. pipeline.stages=[clean]")
    if "pipeline" in cfg.pipeline.stages:
        raise ValueError("pipeline.stages cannot contain 'pipeline'")
    for name in cfg.pipeline.stages:
        stage_runner(name)  # fail on an unknown name before any work starts
    summary: dict[str, Any] = {}
    for name in cfg.pipeline.stages:
        sub = dataclasses.replace(cfg, stage=name, run_dir=None)
        results = run_stage(sub)
        summary[f"{name}.wall_s"] = results["wall_s"]
    summary["stages"] = " -> ".join(cfg.pipeline.stages)
    print(json.dumps(summary, indent=2))
    return summary
