"""``python -m s2train stage=<name> [overrides]``: the one entry point of every stage.

CPU demo:        python -m s2train experiment=demo
One stage:       python -m s2train stage=clean data.path=/data/raw clean.sample_rate=44100
SLURM array:     sbatch --array=0-63 slurm/clean_array.sbatch data.path=/data/raw
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from s2train.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from s2train.cli import dispatch

    dispatch(cfg)


def main() -> None:
    try:
        _hydra_main()
    except ValueError as error:  # a user error, already worded for a user
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
