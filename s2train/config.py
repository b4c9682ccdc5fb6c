"""The composed configuration: ``S2Config`` gathers the config dataclass of every component and stage.

Each component owns its small typed config beside its code (a judge its judge config, the engine its
sampling config, a model its model config, a stage its stage config); this module only composes them and
registers the result with Hydra's ConfigStore as the schema of ``conf/config.yaml``, so a misspelt key
fails when Hydra composes (``Key 'segmnt_max_s' not in 'VADConfig'``). Values a user must give are
``???``; each ``__post_init__`` checks what a type cannot and raises ``ValueError`` with a plain sentence.
Components never import this module: only stages (``run(cfg)``) read the composed config.

Model and codec presets are the YAML files of ``conf/model/`` and ``conf/codec/``; the Python presets of
``s2train.models`` (``tiny()``, ``s2pro()``, ...) are tested identical to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data_pipeline.clean import CleanConfig
from data_pipeline.demo_corpus import DemoCorpusConfig
from data_pipeline.sources import DataConfig
from data_pipeline.tokenize import TokenizeConfig
from eval.demo_report import DemoReportConfig
from eval.stage import EvalConfig
from s2train.cli import PipelineConfig
from s2train.inference.synthesis import SynthesizeConfig
from s2train.judges.suite import JudgesConfig
from s2train.models.codec import CodecConfig
from s2train.models.codec import tiny as codec_tiny
from s2train.models.dual_ar import DualARConfig
from s2train.models.dual_ar import tiny as dual_ar_tiny
from s2train.rl.grpo_stage import GRPOConfig
from s2train.rl.preference import PreferenceConfig
from s2train.serving.serve_stage import ServeConfig
from s2train.text.tokenizer import TextConfig
from s2train.training.codec_module import CodecTrainConfig
from s2train.training.finetune_stage import FinetuneConfig
from s2train.training.lm_data import LMDataConfig
from s2train.training.lm_module import LMTrainConfig
from s2train.training.sft_stage import SFTConfig
from s2train.training.trainer import StrategyConfig


@dataclass
class S2Config:
    stage: str = MISSING
    name: str = "default"  # the experiment's name: runs go to run_root/name/stage
    run_root: str = "runs"
    run_dir: str | None = None  # overrides run_root/name/stage for this stage
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    judges: JudgesConfig = field(default_factory=JudgesConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    demo_corpus: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    codec: CodecConfig = field(default_factory=codec_tiny)  # the `codec` group: conf/codec/*.yaml
    codec_train: CodecTrainConfig = field(default_factory=CodecTrainConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lm_data: LMDataConfig = field(default_factory=LMDataConfig)
    model: DualARConfig = field(default_factory=dual_ar_tiny)  # the `model` group: conf/model/*.yaml
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)  # the `strategy` group
    sft: SFTConfig = field(default_factory=SFTConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # the `eval` group: conf/eval/*.yaml
    demo_report: DemoReportConfig = field(default_factory=DemoReportConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="s2train_schema", node=S2Config)
