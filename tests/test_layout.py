"""Rules of the package layout that a later change must not quietly break: who may import whom (walked
over every import statement, function-level ones included), and model/codec presets written in Python
and in ``conf/`` that agree field by field."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from s2train.models import codec, dual_ar

ROOT = Path(__file__).resolve().parents[1]

# package (a folder of ROOT) -> module prefixes it may not import
FORBIDDEN = {
    "s2train/models": ("s2train.config", "lightning", "hydra", "s2train.training", "data_pipeline", "eval"),
    "s2train/judges": ("s2train.config", "lightning", "hydra", "s2train.training", "data_pipeline", "eval"),
    "s2train/text": ("s2train.config", "lightning", "hydra", "s2train.training", "data_pipeline", "eval"),
    "s2train/inference": ("s2train.training", "data_pipeline"),
    "s2train/serving": ("s2train.training", "s2train.rl", "lightning", "data_pipeline", "eval"),
    "s2train/training": ("data_pipeline", "eval"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in a file, at any depth (``if TYPE_CHECKING:`` blocks too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_the_layout_allows(package):
    assert (ROOT / package).is_dir()
    assert violations(package, FORBIDDEN[package]) == []


def test_the_import_walk_sees_nested_and_type_checking_imports(tmp_path):
    """The rule checker itself: an import inside a function or a TYPE_CHECKING block counts."""
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from s2train.config import S2Config\n"
        "def f():\n    import lightning.pytorch as L\n"
    )
    modules = [m for _, m in imported_modules(path)]
    assert "s2train.config" in modules and "lightning.pytorch" in modules


PRESETS = [
    ("model", name, getattr(dual_ar, name), dual_ar.DualARConfig)
    for name in ("tiny", "demo", "small", "s2pro")
] + [("codec", name, getattr(codec, name), codec.CodecConfig) for name in ("tiny", "s2pro")]


@pytest.mark.parametrize(
    ("group", "name", "preset", "schema"), PRESETS, ids=[f"{g}/{n}" for g, n, *_ in PRESETS]
)
def test_python_presets_equal_their_yaml(group, name, preset, schema):
    """A preset written in Python (for tests and library users) and in conf/ (for the CLI) is one preset."""
    yaml = OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml")
    from_yaml = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), yaml))
    assert dataclasses.asdict(from_yaml) == dataclasses.asdict(preset())


def test_every_yaml_preset_builds_its_config():
    for group, schema in (("model", dual_ar.DualARConfig), ("codec", codec.CodecConfig)):
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))
            assert isinstance(config, schema), path
