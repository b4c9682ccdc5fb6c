"""``stage=grpo``: GRPO alignment of a Dual-AR model with judge rewards, on the shared trainer.

**A step** (``GRPOModule.training_step``):

1. *Prompts*: ``grpo.prompts_per_step`` training prompts, drawn by a generator seeded with the run's seed
   and the step (so a resumed run draws the same ones).
2. *Rollouts*: ``grpo.group_size`` candidates a prompt from the shared ``InferenceEngine`` in exact mode
   (``s2train.rl.rollout``), decoded to audio by the codec. The engine wraps the trainer's own module, so
   the rollout policy is the trainer's weights as they are at the start of the step (the engine reads
   them anew every run and its prefix cache is cleared); the log-probabilities it returns are the "old"
   policy of the clipped ratio. Their gap to the trainer's forward is logged (``logprob_gap``) and tested.
3. *Rewards* (``s2train.rl.rewards``): every weighted reward and the guards, the weighted sum per
   candidate, group-normalised advantages (``s2train.rl.grpo``).
4. *Update*: ``grpo.epochs`` passes over the candidates in ``grpo.minibatches`` minibatches, an optimizer
   step each; the loss is the clipped surrogate over slow and fast tokens plus the k3 KL to the frozen
   starting model (a copy kept out of the checkpoint and rebuilt from ``grpo.init`` on resume).

Lightning counts optimizer steps, so ``max_steps`` of the trainer is ``grpo.train.max_steps * epochs *
minibatches``; ``grpo.train.checkpoint_every`` counts GRPO steps.

**Held-out prompts** (``grpo.heldout_prompts``, set aside by a hash of their key) are spoken
``grpo.eval_samples`` times each before the first step, every ``grpo.eval_every`` steps and at the end,
and scored with the training rewards plus ``grpo.heldout_judge``, a judge not used in training.
``results.json`` compares the last evaluation with the first: the mean total reward, its paired
difference with a 95% bootstrap interval over prompts, and the held-out judge's.

**Prompts** come from ``grpo.prompts``, a JSONL of ``{"id", "text", "lang", "reference_audio",
"reference_text", "caption"}`` (clips relative to the file and inside its folder), or else from the token
data of pretraining: each utterance's text, with probability ``grpo.reference_share`` another utterance
of its speaker as the voice (its codes, and its audio from the clean shards for the speaker reward), and
with probability ``grpo.caption_share`` its caption in the system turn. Utterances longer than
``grpo.max_new_tokens`` frames as recorded are left out: a candidate would have to say them faster than
their speaker did to end in time (``grpo.long_prompts=true`` keeps them).

Outputs: ``metrics.jsonl`` (per step: every reward's score and raw mean, the total, each guard's count,
KL, clip fraction, ratio, entropy of both streams, grad norm, rollout / scoring / update seconds),
``heldout.jsonl`` (every held-out candidate of every evaluation), ``reward_curve.png``, checkpoints and
exact resume, ``model.safetensors`` + ``model.json``, ``results.json``.

    python -m s2train experiment=demo stage=grpo
    python -m s2train stage=grpo name=mine grpo.init=runs/mine/sft grpo.prompts=/data/prompts.jsonl \\
        'grpo.rewards.weights={wer: 1.0, sim: 0.5, preference: 0.5}' \\
        grpo.rewards.preference_model=runs/mine/preference
    sbatch --nodes=2 slurm/grpo.sbatch name=mine grpo.init=runs/mine/sft
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from torch import Tensor

from s2train.checkpoints import open_codec, open_dual_ar, save_dual_ar
from s2train.checks import check
from s2train.inference.engine import InferenceEngine
from s2train.inference.sampling import SamplingParams
from s2train.judges import JUDGE_RATE
from s2train.judges.suite import JudgeSuite
from s2train.models.dual_ar import DualAR
from s2train.rl.grpo import ObjectiveConfig, TokenBatch, combine_rewards, group_advantages, grpo_loss
from s2train.rl.rewards import (
    GuardConfig,
    RewardsConfig,
    Scoring,
    build_rewards,
    fill_not_applicable,
    score_candidates,
)
from s2train.rl.rollout import (
    Candidate,
    RolloutPrompt,
    candidate_batch,
    draw_groups,
    rollout_logprobs,
    token_logprobs,
)
from s2train.runs import jsonl_lines, stage_input
from s2train.stats import bootstrap_interval
from s2train.text.prompt import Reference
from s2train.text.tokenizer import TextTokenizer, model_tokenizer
from s2train.training.lm_module import LMTrainConfig, parameter_groups, read_losses, warmup_cosine
from s2train.training.trainer import TrainerSpec, build_trainer, fit, resume_point

if TYPE_CHECKING:
    from s2train.config import S2Config


def _grpo_train() -> LMTrainConfig:
    return LMTrainConfig(
        max_steps=100, lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, checkpoint_every=10
    )


@dataclass
class GRPOConfig:
    """``stage=grpo`` (``s2train.rl.grpo_stage``)."""

    init: str | None = (
        None  # the model to align: a run dir with model.json, or a release; None: run_root/name/sft
    )
    codec: str | None = None  # None: tokenize.codec
    prompts: str | None = None  # a prompts JSONL; None: from the token data (lm_data.input)
    reference_share: float = 0.7  # prompts from the token data: share cloning a voice
    caption_share: float = 0.3  # ... and share with their caption
    max_prompts: int = 2000  # prompts from the token data: at most this many (the first by key hash)
    long_prompts: bool = False  # ... and keep utterances longer than max_new_tokens frames as recorded
    heldout_prompts: int = 8
    prompts_per_step: int = 4
    group_size: int = 8
    epochs: int = 1  # optimisation passes over one step's rollouts
    minibatches: int = 1  # optimizer steps per pass
    temperature: float = 1.0
    fast_temperature: float = 1.0
    max_new_tokens: int = 512  # frames
    max_batch: int = 32  # rows the engine decodes at once
    eval_every: int = (
        10  # GRPO steps; the held-out prompts are also spoken before the first and after the last
    )
    eval_samples: int = 4  # candidates per held-out prompt and evaluation
    heldout_judge: str | None = (
        "dnsmos"  # a reward scored on held-out prompts only (not trained on); null: none
    )
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    train: LMTrainConfig = field(
        default_factory=_grpo_train
    )  # lr, schedule, checkpoints (in GRPO steps), devices

    def __post_init__(self) -> None:
        for name in (
            "heldout_prompts",
            "prompts_per_step",
            "epochs",
            "minibatches",
            "max_new_tokens",
            "max_batch",
            "eval_every",
            "eval_samples",
            "max_prompts",
        ):
            check(getattr(self, name) >= 1, f"grpo.{name} must be at least 1, not {getattr(self, name)}")
        check(
            self.group_size >= 2,
            f"grpo.group_size must be at least 2 (advantages compare a group), not {self.group_size}",
        )
        check(
            self.temperature > 0 and self.fast_temperature > 0,
            "grpo.temperature and fast_temperature must be positive",
        )
        for name in ("reference_share", "caption_share"):
            check(0 <= getattr(self, name) <= 1, f"grpo.{name} must be in [0, 1]")
        check(
            self.minibatches <= self.prompts_per_step * self.group_size,
            "grpo.minibatches cannot exceed the candidates of a step (prompts_per_step * group_size)",
        )

    @property
    def updates_per_step(self) -> int:
        return self.epochs * self.minibatches


# -------------------------------------------------------------------------------------------- prompts


def _key_rank(key: str, seed: int) -> int:
    """A prompt's place in the seeded hash order (the first ones are held out)."""
    return int(hashlib.sha1(f"{seed}/{key}".encode()).hexdigest()[:8], 16)


def prompts_from_jsonl(path: Path, codec) -> list[RolloutPrompt]:
    """Prompts of a JSONL file (module doc); reference clips must lie in the file's folder."""
    import soundfile as sf

    from s2train.audio import resample
    from s2train.inference.synthesis import read_reference, resolve_reference

    folder = path.parent.resolve()
    out = []
    for n, where, row in jsonl_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f'{where}: a prompt is an object with a non-empty "text"')
        key = str(row.get("id", f"line-{n}"))
        references, audio = [], None
        if row.get("reference_audio"):
            if not row.get("reference_text"):
                raise ValueError(f"{where}: reference_audio needs its reference_text")
            clip = resolve_reference(row["reference_audio"], folder, [folder], key)
            references = [Reference(row["reference_text"], read_reference(clip, codec))]
            wav, rate = sf.read(clip, dtype="float32", always_2d=True)
            audio = resample(wav.mean(axis=1), rate, JUDGE_RATE)
        out.append(
            RolloutPrompt(
                key,
                row["text"],
                row.get("lang", "en"),
                references,
                audio,
                row.get("caption"),
                re.findall(r"\[[^\]]+\]", row["text"]),
            )
        )
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def prompts_from_data(cfg: S2Config, g: GRPOConfig) -> list[RolloutPrompt]:
    """Prompts from the token data (module doc): text, maybe a reference of the same speaker, maybe the
    caption; the reference audio from the clean shards where they hold it."""
    from s2train.training.codec_data import index_shards, read_audio
    from s2train.training.lm_data import open_token_source
    from s2train.training.pretrain_stage import token_input

    source = open_token_source(token_input(cfg), cfg.lm_data.hf_rows_per_unit)
    clean = Path(cfg.run_root) / cfg.name / "clean" / "shards"
    audio_of = {u.key: u for u in index_shards(clean)} if clean.is_dir() else {}
    rng = np.random.default_rng([cfg.seed, 11])
    out = []
    for unit in range(source.n_units):
        utterances = source.read_unit(unit)
        for u in utterances:
            if not u.text.strip() or u.lang not in (None, "en", "zh"):
                continue
            if u.codes.shape[-1] > g.max_new_tokens and not g.long_prompts:
                continue  # longer than the budget as recorded: its candidates would mostly hit no_end
            same = [x for x in utterances if x.speaker == u.speaker and x.key != u.key]
            references, audio = [], None
            if same and rng.random() < g.reference_share:
                ref = same[int(rng.integers(len(same)))]
                references = [Reference(ref.text, torch.from_numpy(ref.codes.astype(np.int64)))]
                if ref.key in audio_of:
                    audio = read_audio(audio_of[ref.key], JUDGE_RATE)
            caption = u.caption if (u.caption and rng.random() < g.caption_share) else None
            out.append(RolloutPrompt(u.key, u.text, u.lang or "en", references, audio, caption))
    out.sort(key=lambda p: _key_rank(p.key, cfg.seed))
    return out[: g.max_prompts + g.heldout_prompts]


def fits(
    prompt: RolloutPrompt, tokenizer: TextTokenizer, model: DualAR, max_new_tokens: int, system_turn: bool
) -> bool:
    from s2train.text.prompt import build_prompt

    tokens = build_prompt(
        tokenizer,
        prompt.text,
        model.config.num_codebooks,
        references=prompt.references,
        caption=prompt.caption,
        system_turn=system_turn,
    ).tokens
    return tokens.shape[1] + max_new_tokens <= model.config.max_seq_len


# --------------------------------------------------------------------------------------------- module


class _Steps(torch.utils.data.IterableDataset):
    """The step numbers: GRPO draws its own data (rollouts), the loader only paces the trainer."""

    def __iter__(self):
        step = 0
        while True:
            yield step
            step += 1


class GRPOModule(L.LightningModule):
    def __init__(
        self,
        cfg: S2Config,
        model_cfg,
        init_state: dict[str, Tensor],
        tokenizer: TextTokenizer,
        codec,
        train_prompts: list[RolloutPrompt],
        heldout: list[RolloutPrompt],
        run_dir: Path,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.cfg, self.g = cfg, cfg.grpo
        self.model_cfg, self.tokenizer = model_cfg, tokenizer
        self.init_state = init_state
        self.train_prompts, self.heldout = train_prompts, heldout
        self.run_dir = Path(run_dir)
        self.model: DualAR | None = None
        self._frozen: dict = {}  # the reference model and the codec: kept out of the state dict
        self._frozen["codec"] = codec
        self.judges = JudgeSuite(cfg.judges, cfg.seed)
        self.rewards = build_rewards(self.g.rewards)
        extra = self.g.heldout_judge
        self.eval_rewards = dict(self.rewards)
        if extra and extra not in self.eval_rewards:
            self.eval_rewards.update(build_rewards(self.g.rewards, [extra]))
        self.im_end = tokenizer.token_id("<|im_end|>")
        self.sampling = SamplingParams.exact_at(self.g.temperature, self.g.fast_temperature)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = DualAR(self.model_cfg)
            self.model.load_state_dict(self.init_state)
            if self.g.objective.kl_coef > 0:
                ref = DualAR(self.model_cfg)
                ref.load_state_dict(self.init_state)
                self._frozen["reference"] = ref.eval().requires_grad_(False)

    @property
    def reference(self) -> DualAR | None:
        return self._frozen.get("reference")

    @property
    def codec(self):
        return self._frozen["codec"]

    def on_fit_start(self) -> None:
        for name in ("reference", "codec"):
            if self._frozen.get(name) is not None:
                self._frozen[name] = self._frozen[name].to(self.device)
        self.engine = InferenceEngine(self.model, self.im_end, max_batch=self.g.max_batch, cuda_graph=False)
        self.model.train()

    # ------------------------------------------------------------------------------------ rollouts

    def rollouts(self, prompts: list[RolloutPrompt], step: int, group: int, seed: int) -> list[Candidate]:
        self.model.eval()
        try:
            return draw_groups(
                self.engine,
                self.tokenizer,
                prompts,
                group_size=group,
                sampling=self.sampling,
                max_new_tokens=self.g.max_new_tokens,
                seed=seed,
                step=step,
                system_turn=self.cfg.text.system_turn,
            )
        finally:
            self.model.train()

    @torch.no_grad()
    def audio(self, candidates: list[Candidate]) -> list[np.ndarray]:
        from s2train.audio import resample

        rate = self.codec.config.sample_rate
        out = []
        for c in candidates:
            codes = c.generation.codes
            if not codes.shape[1]:
                out.append(np.zeros(0, np.float32))
                continue
            wav = self.codec.decode(codes.to(self.device))[0, 0].float().cpu().numpy()
            out.append(resample(wav, rate, JUDGE_RATE))
        return out

    def score(self, rewards: dict, prompts: list[RolloutPrompt], candidates: list[Candidate]):
        scoring = Scoring(
            self.judges,
            self.audio(candidates),
            [prompts[c.prompt_index] for c in candidates],
            [c.generation.codes[0].numpy() for c in candidates],
            [c.generation.stopped for c in candidates],
            self.g.guards.loudness_lufs,
        )
        return score_candidates(rewards, self.g.rewards, self.g.guards, scoring)

    def totals(
        self, scores, prompts: int, group: int, normalise_each: bool | None = None
    ) -> tuple[Tensor, dict[str, np.ndarray]]:
        """(P, G) total reward (the weighted sum, NaN scores at their group's mean) and the filled parts;
        each reward group-normalised first with ``normalise_each`` (default: ``grpo.objective``'s)."""
        weights = {k: v for k, v in self.g.rewards.weights.items() if v > 0}
        filled = {k: fill_not_applicable(scores.components[k].reshape(prompts, group)) for k in weights}
        total = combine_rewards(
            {k: torch.from_numpy(v) for k, v in filled.items()},
            weights,
            normalise_each=self.g.objective.normalise_each if normalise_each is None else normalise_each,
            std_floor=self.g.objective.std_floor,
        )
        return total, filled

    # ---------------------------------------------------------------------------------------- step

    def training_step(self, batch, batch_idx):
        g, o = self.g, self.g.objective
        step = self.global_step // g.updates_per_step
        rank, world = self.global_rank, self.trainer.world_size
        rng = np.random.default_rng([self.cfg.seed, step])
        chosen = rng.choice(
            len(self.train_prompts),
            size=g.prompts_per_step * world,
            replace=len(self.train_prompts) < g.prompts_per_step * world,
        )
        prompts = [self.train_prompts[int(i)] for i in chosen[rank::world]]

        started = time.perf_counter()
        candidates = self.rollouts(prompts, step, g.group_size, self.cfg.seed * 1000 + rank)
        rollout_s = time.perf_counter() - started
        started = time.perf_counter()
        scores = self.score(self.rewards, prompts, candidates)
        score_s = time.perf_counter() - started

        started = time.perf_counter()
        P, G = len(prompts), g.group_size
        # with normalise_each the parts are already z-scores: the sum is standardised again
        total, _ = self.totals(scores, P, G)
        advantages = group_advantages(total, o.std_floor).reshape(-1).float()  # (B,)
        data = candidate_batch(candidates, self.tokenizer)
        data = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in data.items()}
        old = rollout_logprobs(candidates)
        K = self.model_cfg.num_codebooks
        fast_weight = o.fast_weight if o.fast_weight is not None else 1.0 / max(1, K - 1)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = token_logprobs(self.reference, data, self.im_end, g.temperature, g.fast_temperature)
        optimizer = self.optimizers()
        schedule = self.lr_schedulers()
        B = len(candidates)
        order = torch.arange(B)
        logs: dict[str, float] = {}
        gap = None
        for epoch in range(g.epochs):
            perm = (
                order[
                    torch.randperm(
                        B, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + step * 31 + epoch)
                    )
                ]
                if g.minibatches > 1
                else order
            )
            for rows in torch.tensor_split(perm, g.minibatches):
                keep = torch.zeros(B, dtype=torch.bool)
                keep[rows] = True
                now = token_logprobs(self.model, data, self.im_end, g.temperature, g.fast_temperature)
                tokens = self._tokens(now, old, ref, advantages, keep, fast_weight)
                if gap is None:
                    gap = float((now.flat().detach().cpu() - old.flat()).abs().max())
                out = grpo_loss(tokens, o)
                optimizer.zero_grad()
                self.manual_backward(out["loss/total"])
                norm = self._clip()
                optimizer.step()
                schedule.step()
                logs = {k: float(v) for k, v in out.items()}
                logs["grad_norm"] = norm
                logs["entropy/slow"], logs["entropy/fast"] = now.slow_entropy, now.fast_entropy
        update_s = time.perf_counter() - started

        row = {
            "step": step + 1,
            **logs,
            "logprob_gap": gap,
            "rollout_s": round(rollout_s, 3),
            "score_s": round(score_s, 3),
            "update_s": round(update_s, 3),
            "frames": int(sum(c.generation.codes.shape[1] for c in candidates)),
            "reward/total": float(total.mean()),
        }
        for name in scores.components:
            row[f"reward/{name}"] = (
                float(np.nanmean(scores.components[name]))
                if np.isfinite(scores.components[name]).any()
                else None
            )
            raw = scores.raw[name]
            row[f"raw/{name}"] = float(np.nanmean(raw)) if np.isfinite(raw).any() else None
        for guard in g.guards.enabled:
            row[f"guard/{guard}"] = sum(guard in f for f in scores.guards)
        self.log_dict({k: v for k, v in row.items() if isinstance(v, float) and np.isfinite(v)}, on_step=True)
        if self.trainer.is_global_zero:
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        if (step + 1) % g.eval_every == 0 or step + 1 == g.train.max_steps:
            self.evaluate(step + 1)

    def _tokens(self, now, old, ref, advantages, keep, fast_weight) -> TokenBatch:
        device = now.slow.device
        owners = torch.cat([now.slow_owner, now.fast_owner.repeat_interleave(now.fast.shape[1])]).to(device)
        fast = torch.cat(
            [
                torch.zeros_like(now.slow_owner, dtype=torch.bool),
                torch.ones(now.fast.numel(), dtype=torch.bool, device=device),
            ]
        ).to(device)
        mask = keep.to(device)[owners]
        weight = torch.where(fast, torch.tensor(fast_weight, device=device), torch.tensor(1.0, device=device))
        return TokenBatch(
            logp=now.flat()[mask],
            old_logp=old.flat().to(device)[mask],
            ref_logp=None if ref is None else ref.flat().detach()[mask],
            advantage=advantages.to(device)[owners][mask],
            weight=weight[mask],
            fast=fast[mask],
        )

    def _clip(self) -> float:
        clip = self.g.train.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, clip))
        return (
            float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        )

    # ------------------------------------------------------------------------------------ held out

    def on_train_start(self) -> None:
        """Cut the records back to the checkpoint's step: a resumed run has the rows up to it (the
        evaluation of that step included); a run that starts from scratch, none (it evaluates step 0)."""
        step = self.global_step // self.g.updates_per_step
        if self.trainer.is_global_zero:
            for name in ("metrics.jsonl", "heldout.jsonl"):
                path = self.run_dir / name
                if path.exists():
                    kept = [r for r in read_losses(path) if step > 0 and r["step"] <= step]
                    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if self.global_step == 0:
            self.evaluate(0)

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """The held-out prompts, ``eval_samples`` candidates each, scored; rank 0 writes heldout.jsonl."""
        if not self.trainer.is_global_zero:
            return
        g = self.g
        candidates = self.rollouts(
            self.heldout, 10**9, g.eval_samples, self.cfg.seed
        )  # the same seeds every time
        scores = self.score(self.eval_rewards, self.heldout, candidates)
        # the rewards themselves: normalised within each prompt's candidates, every prompt's total would
        # be 0 and no evaluation could differ from another
        total, _ = self.totals(scores, len(self.heldout), g.eval_samples, normalise_each=False)
        total = total.reshape(-1)
        with (self.run_dir / "heldout.jsonl").open("a") as f:
            for i, c in enumerate(candidates):
                row = {
                    "step": step,
                    "prompt": self.heldout[c.prompt_index].key,
                    "sample": c.candidate,
                    "total": float(total[i]),
                    "frames": int(c.generation.codes.shape[1]),
                    "stopped": bool(c.generation.stopped),
                    "guards": scores.guards[i],
                }
                for name in scores.components:
                    value = scores.components[name][i]
                    row[name] = None if np.isnan(value) else float(value)
                    raw = scores.raw[name][i]
                    row[f"raw_{name}"] = None if np.isnan(raw) else float(raw)
                f.write(json.dumps(row) + "\n")

    def configure_optimizers(self):
        t, g = self.g.train, self.g
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, t.weight_decay), lr=t.lr, betas=tuple(t.betas)
        )
        updates = t.max_steps * g.updates_per_step
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: warmup_cosine(s, t.warmup_steps * g.updates_per_step, updates, t.min_lr_ratio),
        )
        return [optimizer], [schedule]


# -------------------------------------------------------------------------------------------- figures


def heldout_summary(rows: list[dict], judge: str | None, seed: int) -> dict:
    """The first and last evaluation of heldout.jsonl compared prompt by prompt."""
    steps = sorted({r["step"] for r in rows})
    if len(steps) < 2:
        return {"heldout_evaluations": len(steps)}
    first, last = steps[0], steps[-1]

    def per_prompt(step: int, name: str) -> dict[str, float]:
        out: dict[str, list[float]] = {}
        for r in rows:
            if r["step"] == step and r.get(name) is not None:
                out.setdefault(r["prompt"], []).append(r[name])
        return {k: float(np.mean(v)) for k, v in out.items()}

    summary: dict = {
        "heldout_evaluations": len(steps),
        "heldout_first_step": first,
        "heldout_last_step": last,
    }
    for name in ["total"] + ([f"raw_{judge}"] if judge else []):
        a, b = per_prompt(first, name), per_prompt(last, name)
        keys = sorted(set(a) & set(b))
        if not keys:
            continue
        diff = np.array([b[k] - a[k] for k in keys])
        low, high = bootstrap_interval(diff, seed)
        label = "reward" if name == "total" else judge
        summary[f"heldout_{label}_before"] = round(float(np.mean([a[k] for k in keys])), 4)
        summary[f"heldout_{label}_after"] = round(float(np.mean([b[k] for k in keys])), 4)
        summary[f"heldout_{label}_change"] = round(float(diff.mean()), 4)
        summary[f"heldout_{label}_change_ci95"] = [round(low, 4), round(high, 4)]
    return summary


def plot_rewards(metrics: list[dict], heldout: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [m["step"] for m in metrics]
    names = sorted({k for m in metrics for k in m if k.startswith("reward/")})
    for name in names:
        left.plot(
            steps,
            [m.get(name) if m.get(name) is not None else np.nan for m in metrics],
            label=name,
            linewidth=1.2,
        )
    left.set_xlabel("step")
    left.set_ylabel("mean reward of the rollouts")
    left.set_title(f"{title}: training rollouts")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    evals = sorted({r["step"] for r in heldout})
    values = [[r["total"] for r in heldout if r["step"] == s] for s in evals]
    right.errorbar(
        evals,
        [np.mean(v) for v in values],
        yerr=[np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0 for v in values],
        fmt="o-",
        capsize=3,
        label="total (mean, standard error)",
    )
    right.set_xlabel("step")
    right.set_ylabel("mean total reward")
    right.set_title("held-out prompts")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- stage


def run(cfg: S2Config) -> dict | None:
    g = cfg.grpo
    run_dir = Path(cfg.run_dir)
    if cfg.strategy.name == "deepspeed_zero3":
        raise ValueError(
            "stage=grpo generates its rollouts with the trainer's own weights, which ZeRO-3 partitions across "
            "ranks: use strategy=ddp or deepspeed_zero2"
        )
    if g.train.devices * g.train.num_nodes > 1 and g.updates_per_step > 1:
        raise ValueError(
            "several ranks update once a step: DDP averages one backward pass per step, so "
            f"grpo.epochs * grpo.minibatches must be 1 there, not {g.updates_per_step}"
        )
    init = stage_input(cfg, "sft", g.init)
    model, release = open_dual_ar(init, dtype=torch.float32, key="grpo.init")
    tokenizer = model_tokenizer(release, cfg.text)
    codec, _ = open_codec(g.codec or cfg.tokenize.codec, key="grpo.codec")
    if g.prompts:
        prompts = prompts_from_jsonl(Path(g.prompts), codec)
    else:
        prompts = prompts_from_data(cfg, g)
    usable = [p for p in prompts if fits(p, tokenizer, model, g.max_new_tokens, cfg.text.system_turn)]
    if len(usable) <= g.heldout_prompts:
        raise ValueError(
            f"{len(usable)} prompts fit the model's max_seq_len {model.config.max_seq_len} with "
            f"grpo.max_new_tokens={g.max_new_tokens} (of {len(prompts)}): too few for "
            f"grpo.heldout_prompts={g.heldout_prompts} and training"
        )
    ranked = sorted(usable, key=lambda p: _key_rank(p.key, cfg.seed))  # the first by key hash are held out
    heldout, train = ranked[: g.heldout_prompts], ranked[g.heldout_prompts :]

    t = g.train
    updates = g.updates_per_step
    trainer = build_trainer(
        TrainerSpec(
            run_dir=run_dir,
            run_id=f"{cfg.name}-grpo-{cfg.seed}",
            max_steps=t.max_steps * updates,
            checkpoint_every=t.checkpoint_every * updates,
            log_every=1,
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=cfg.strategy,
            precision=t.precision,
            grad_clip=None,  # manual optimisation clips in the step
            progress=t.progress,
            wandb=t.wandb,
            wandb_project=t.wandb_project,
            threads=t.threads,
        ),
        use_distributed_sampler=False,
    )
    torch.manual_seed(cfg.seed)
    module = GRPOModule(cfg, model.config, model.state_dict(), tokenizer, codec, train, heldout, run_dir)
    resume = resume_point(run_dir)
    loader = torch.utils.data.DataLoader(_Steps(), batch_size=None)
    train_s = fit(trainer, module, resume, train_dataloaders=loader)
    if not trainer.is_global_zero:
        return None
    state = {k: v.detach().contiguous().cpu() for k, v in module.model.state_dict().items()}
    save_dual_ar(model.config, state, run_dir, tokenizer)
    metrics = read_losses(run_dir / "metrics.jsonl")
    heldout_rows = read_losses(run_dir / "heldout.jsonl")
    plot_rewards(metrics, heldout_rows, run_dir / "reward_curve.png", f"{cfg.name}: grpo")
    timing = (
        {k: round(float(np.sum([m[k] for m in metrics])), 2) for k in ("rollout_s", "score_s", "update_s")}
        if metrics
        else {}
    )
    results = {
        "init": str(init),
        "steps": trainer.global_step // updates,
        "resumed_from_step": resume.step // updates,
        "train_prompts": len(train),
        "heldout_prompts": len(heldout),
        "rewards": {k: w for k, w in g.rewards.weights.items() if w > 0},
        "heldout_judge": g.heldout_judge,
        "train_wall_s": round(train_s, 2),
        **timing,
        **heldout_summary(heldout_rows, g.heldout_judge, cfg.seed),
        "reward_curve": str(run_dir / "reward_curve.png"),
        "model": str(run_dir / "model.safetensors"),
    }
    if metrics:
        results["first_reward"] = round(metrics[0]["reward/total"], 4)
        results["final_reward"] = round(metrics[-1]["reward/total"], 4)
    return results
