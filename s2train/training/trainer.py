"""The one Lightning ``Trainer`` builder every training stage uses."""

from __future__ import annotations

from dataclasses import dataclass

from s2train.checks import check


@dataclass
class StrategyConfig:
    """How training is distributed (the ``strategy`` group: ddp, deepspeed_zero2, deepspeed_zero3)."""

    name: str = "ddp"  # ddp | deepspeed_zero2 | deepspeed_zero3
    process_group_backend: str | None = None  # None: nccl on GPU, gloo on CPU
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory
    offload_parameters: bool = False  # DeepSpeed ZeRO-3: parameters in CPU memory

    def __post_init__(self) -> None:
        known = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
        check(self.name in known, f"strategy.name must be one of {', '.join(known)}, not {self.name!r}")
        check(
            self.process_group_backend in (None, "nccl", "gloo"),
            f"strategy.process_group_backend must be nccl or gloo, not {self.process_group_backend!r}",
        )
