"""The codec's LightningModule: it owns the ``Codec``, its losses, the optional discriminator, the
optimizers, per-codebook usage metrics, dead-code restarts and reconstruction previews.

Shape legend: B batch, T samples, K codebooks, T' frames.

Optimization is manual in both modes so one ``training_step`` serves both: without discriminator one
AdamW step per batch; with it, a discriminator step then a codec step. Lightning counts every optimizer
step in ``global_step``, so with the discriminator ``global_step`` is twice ``self.step`` (codec updates);
``codec_stage`` scales ``max_steps`` and the checkpoint interval to match. Every logged loss name is a key
of ``loss_weights``, and only the weighted ones add up to ``loss/total``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from s2train.checks import check
from s2train.models.codec import Codec, CodecConfig
from s2train.training.audio_losses import LogMel, MultiResolutionSTFTLoss, MultiScaleMelLoss
from s2train.training.discriminators import (
    Discriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)


@dataclass
class CodecTrainConfig:
    """``stage=codec``: train the RVQ codec on clean shards (see ``s2train.training.codec_stage``)."""

    input: str | None = None  # a clean run directory; None: run_root/name/clean
    segment_s: float = 0.64  # random crop length of every training item, in seconds
    batch_size: int = 4
    num_workers: int = 0  # dataloader worker processes (each takes its share of the utterances)
    max_steps: int = 1000  # codec (generator) updates
    lr: float = 3e-4  # AdamW, betas (0.8, 0.99), for the codec and the discriminator alike
    lr_decay: float = 0.999996  # exponential decay per step (DAC)
    lr_cooldown: float = 0.0  # the last this share of max_steps takes the lr linearly down to zero
    warmup_steps: int = 100  # linear LR warm-up; the quantizer is bypassed as long (at most half the run),
    # then its codebooks start from the encoder's outputs: young codebooks otherwise collapse
    grad_clip: float = 1000.0  # max grad norm of each optimizer's parameters
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {
            "mel/loss": 15.0,
            "stft/loss": 1.0,
            "vq/commitment": 0.25,
            "vq/codebook": 1.0,
            "adv/gen": 1.0,
            "adv/feat": 2.0,
        }
    )
    mel_windows: list[int] = field(default_factory=lambda: [512, 1024, 2048])  # FFT sizes of the mel loss
    mel_bins: list[int] = field(default_factory=lambda: [40, 80, 160])  # mel bands, one per window
    stft_windows: list[int] = field(default_factory=lambda: [512, 1024, 2048])  # STFT loss and discriminator
    adversarial: bool = False  # add the period and STFT discriminators (adv/gen, adv/feat)
    adv_loss: str = "hinge"  # hinge | lsgan
    disc_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    disc_width: int = 16  # channels of the discriminators' first layers
    dead_code_every: int = 100  # restart unused codes every this many steps; 0: never
    heldout_items: int = 2  # utterances set aside (by a hash of their key) for previews and the final score
    preview_every: int = 500  # write reconstructions of the held-out items every this many steps; 0: never
    checkpoint_every: int = 500  # Lightning checkpoint (and last.ckpt) every this many steps
    log_every: int = 10
    accelerator: str = "auto"  # cpu | gpu | auto
    precision: str = "32-true"  # a Lightning precision (32-true, bf16-mixed, ...) or auto: bf16-mixed on GPU
    threads: int = 0  # torch intra-op threads on a CPU; 0 leaves torch's default
    wandb: bool = False  # also log to Weights & Biases (offline unless WANDB_MODE is set)
    wandb_project: str = "s2train"

    def __post_init__(self) -> None:
        check(self.segment_s > 0, "codec_train.segment_s must be positive")
        check(self.batch_size >= 1, "codec_train.batch_size must be at least 1")
        check(self.num_workers >= 0, "codec_train.num_workers cannot be negative")
        check(self.max_steps >= 1, "codec_train.max_steps must be at least 1")
        check(self.lr > 0 and 0 < self.lr_decay <= 1, "need codec_train.lr > 0 and 0 < lr_decay <= 1")
        check(0 <= self.lr_cooldown <= 1, "codec_train.lr_cooldown is a share of max_steps: 0 to 1")
        check(self.grad_clip > 0, "codec_train.grad_clip must be positive")
        check(self.warmup_steps >= 0, "codec_train.warmup_steps cannot be negative")
        known = {"mel/loss", "stft/loss", "vq/commitment", "vq/codebook", "adv/gen", "adv/feat"}
        unknown = sorted(set(self.loss_weights) - known)
        check(
            not unknown,
            f"codec_train.loss_weights has unknown keys {unknown}; the known ones are {sorted(known)}",
        )
        check(
            len(self.mel_windows) == len(self.mel_bins) > 0,
            "codec_train.mel_windows and mel_bins need the same, non-zero number of entries",
        )
        check(len(self.stft_windows) > 0, "codec_train.stft_windows cannot be empty")
        check(
            self.adv_loss in ("hinge", "lsgan"),
            f"codec_train.adv_loss must be hinge or lsgan, not {self.adv_loss!r}",
        )
        check(self.heldout_items >= 1, "codec_train.heldout_items must be at least 1")
        for name in ("dead_code_every", "preview_every"):
            check(getattr(self, name) >= 0, f"codec_train.{name} cannot be negative")
        for name in ("checkpoint_every", "log_every", "disc_width"):
            check(getattr(self, name) >= 1, f"codec_train.{name} must be at least 1")


RECONSTRUCTION_LOSSES = ("mel/loss", "stft/loss", "vq/commitment", "vq/codebook")
ADVERSARIAL_LOSSES = ("adv/gen", "adv/feat")


def lr_factor(train: CodecTrainConfig, step: int) -> float:
    """The learning rate at codec update ``step`` as a multiple of ``lr``: a linear warm-up, DAC's
    exponential decay, and a linear cool-down to zero over the last ``lr_cooldown`` of the run.

    Without the warm-up Adam's first steps (each parameter moved by the full lr) shift every encoder
    output together by far more than the frames differ, and the codebooks collapse to a code or two. The
    cool-down lets a short run settle: over the last 30% of the demo codec's 4,500 steps it took the
    held-out mel distance from 0.163 (a constant lr) to 0.154."""
    factor = min(1.0, (step + 1) / max(1, train.warmup_steps)) * train.lr_decay**step
    cooldown = train.lr_cooldown * train.max_steps
    if cooldown > 0:
        factor *= min(1.0, max(0.0, train.max_steps - step) / cooldown)
    return factor


def perplexity(codes: Tensor, size: int) -> float:
    """exp(entropy) of the code histogram of one codebook's codes (any shape): 1 (one code) .. size."""
    p = torch.bincount(codes.flatten(), minlength=size).float()
    p = p / p.sum()
    return math.exp(-float((p * p.clamp(min=1e-12).log()).sum()))


class CodecModule(L.LightningModule):
    def __init__(
        self,
        codec_config: CodecConfig,
        train: CodecTrainConfig,
        run_dir: Path,
        heldout: dict[str, np.ndarray],
    ):
        super().__init__()
        self.codec = Codec(codec_config)
        self.train_cfg = train
        sample_rate = codec_config.sample_rate
        self.mel_loss = MultiScaleMelLoss(sample_rate, train.mel_windows, train.mel_bins)
        self.stft_loss = MultiResolutionSTFTLoss(train.stft_windows)
        self.discriminator = (
            Discriminator(train.disc_periods, train.stft_windows, train.disc_width)
            if train.adversarial
            else None
        )
        active = RECONSTRUCTION_LOSSES + (ADVERSARIAL_LOSSES if train.adversarial else ())
        self.loss_weights = {name: float(train.loss_weights.get(name, 0.0)) for name in active}
        self.automatic_optimization = False
        self.preview_dir = Path(run_dir) / "previews"
        self.heldout = heldout  # key -> (T,) float32 at the codec's rate
        self.last_losses: dict[str, float] = {}
        self.last_perplexity: list[float] = []

    @property
    def steps_per_batch(self) -> int:
        """Optimizer steps per batch: Lightning's ``global_step`` grows by this much per codec update."""
        return 1 if self.discriminator is None else 2

    @property
    def step(self) -> int:
        """Codec updates done."""
        return self.global_step // self.steps_per_batch

    def configure_optimizers(self):
        t = self.train_cfg

        def adam(params):
            params = list(params)
            # The fused kernel: a third of the per-tensor loop's time on a CPU, and on a GPU one launch.
            fused = all(p.device.type in ("cpu", "cuda") for p in params)
            optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(0.8, 0.99), fused=fused)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, t))
            return optimizer, schedule

        parts = [adam(self.codec.parameters())]
        if self.discriminator is not None:
            parts.append(adam(self.discriminator.parameters()))
        return [o for o, _ in parts], [s for _, s in parts]

    def _update(self, optimizer, loss: Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(
            optimizer, gradient_clip_val=self.train_cfg.grad_clip, gradient_clip_algorithm="norm"
        )
        optimizer.step()

    @property
    def vq_start(self) -> int:
        """The codec update from which the quantizer is on. During the learning-rate warm-up the decoder
        gets the encoder's latent unquantised: codebooks drawn from a young encoder's near-constant output
        collapse to a code or two, and then nothing reaches the decoder. At the end of the warm-up (at
        most half the run: a short run must still train its codebooks) they start from the trained
        encoder's outputs (``tend_codebooks``)."""
        return max(1, min(self.train_cfg.warmup_steps, self.train_cfg.max_steps // 2))

    def reconstruction_terms(self, wav: Tensor, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """The unweighted reconstruction and quantizer losses of the codec's output ``out`` for ``wav``."""
        return {
            "mel/loss": self.mel_loss(out["audio"], wav),
            "stft/loss": self.stft_loss(out["audio"], wav),
            "vq/commitment": out["commitment_loss"],
            "vq/codebook": out["codebook_loss"],
        }

    def tend_codebooks(self, done: int) -> int | None:
        """After codec update ``done``: the codebooks' data-dependent init at ``vq_start`` (centred z_e,
        rows drawn from the recent batches: without it one code wins every frame and the quantizer
        collapses to perplexity 1 within a few steps), then a dead-code restart every
        ``dead_code_every`` updates. Returns the number of codes restarted, or None when none were due."""
        every = self.train_cfg.dead_code_every
        if done == self.vq_start:
            self.codec.quantizer.init_from_recent()
        elif every and done % every == 0 and done > self.vq_start:
            return self.codec.restart_dead_codes()
        return None

    def training_step(self, wav: Tensor, batch_idx: int) -> None:
        """One codec update (and one discriminator update before it) on crops ``wav`` (B, 1, T)."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        out = self.codec(wav, bypass_quantizer=self.step < self.vq_start)
        recon = out["audio"]  # (B, 1, T)
        logs: dict[str, Tensor] = {}
        if self.discriminator is not None:
            kind = self.train_cfg.adv_loss
            disc_loss = discriminator_loss(self.discriminator(wav), self.discriminator(recon.detach()), kind)
            self._update(optimizers[1], disc_loss)
            logs["adv/disc"] = disc_loss.detach()
        terms = self.reconstruction_terms(wav, out)
        if self.discriminator is not None:
            with torch.no_grad():
                real = self.discriminator(wav)
            fake = self.discriminator(recon)
            terms["adv/gen"] = generator_loss(fake, self.train_cfg.adv_loss)
            terms["adv/feat"] = feature_matching_loss(real, fake)
        total = sum(self.loss_weights[name] * value for name, value in terms.items())
        self._update(optimizers[0], total)
        for scheduler in schedulers:
            scheduler.step()
        done = self.step
        if done % self.train_cfg.log_every == 0 or done == self.train_cfg.max_steps:
            # Only on the steps Lightning writes (log_every_n_steps=log_every): logging every step cost
            # a tenth of a demo codec's step.
            logs.update({name: value.detach() for name, value in terms.items()})
            logs["loss/total"] = total.detach()
            logs.update(self._usage(out["codes"]))
            self.last_losses = {name: float(value) for name, value in logs.items() if "/" in name}
            self.log_dict(logs, on_step=True, on_epoch=False)
            self.log("lr", schedulers[0].get_last_lr()[0], on_step=True, on_epoch=False)
        restarted = self.tend_codebooks(done)
        if restarted is not None:
            self._log_once({"vq/restarted": float(restarted)})
        if self.train_cfg.preview_every and done % self.train_cfg.preview_every == 0:
            self._log_once({"heldout/mel": self.write_previews(done)})

    def _log_once(self, metrics: dict[str, float]) -> None:
        """Metrics of this step alone, straight to the loggers: Lightning repeats an on-step value on every
        later row it writes until the name is logged again, and these are logged on their own steps."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step - 1)  # the row numbering of Lightning's own

    def _usage(self, codes_BKT: Tensor) -> dict[str, Tensor]:
        """Per codebook k: ``vq/perplexity_k`` of this batch's codes and ``vq/dead_k``, the codes unused
        since the last dead-code restart."""
        quantizers = [self.codec.quantizer.semantic, *self.codec.quantizer.residual]
        self.last_perplexity = [
            perplexity(codes_BKT[:, k], vq.codebook.num_embeddings) for k, vq in enumerate(quantizers)
        ]
        logs = {}
        for k, vq in enumerate(quantizers):
            logs[f"vq/perplexity_{k}"] = torch.tensor(self.last_perplexity[k])
            logs[f"vq/dead_{k}"] = (vq.usage == 0).sum().float()
        return logs

    @torch.no_grad()
    def reconstruct(self, wav: np.ndarray) -> np.ndarray:
        """A held-out utterance (T,) through the codec in eval mode (every codebook) -> (T,)."""
        was_training = self.codec.training
        self.codec.eval()
        recon = self.codec(torch.from_numpy(wav).to(self.device)[None, None])["audio"]
        self.codec.train(was_training)
        return recon[0, 0].float().cpu().numpy()

    @torch.no_grad()
    def heldout_mel_distance(self) -> float:
        """Mean multi-scale log-mel L1 between the held-out utterances and their reconstructions."""
        distances = []
        for wav in self.heldout.values():
            recon = torch.from_numpy(self.reconstruct(wav))[None, None].to(self.device)
            distances.append(float(self.mel_loss(recon, torch.from_numpy(wav)[None, None].to(self.device))))
        return float(np.mean(distances))

    @torch.no_grad()
    def heldout_usage(self) -> list[float]:
        """Per codebook: the share of its entries that the held-out utterances use."""
        quantizers = [self.codec.quantizer.semantic, *self.codec.quantizer.residual]
        used = [set() for _ in quantizers]
        for wav in self.heldout.values():
            codes = self.codec.encode(torch.from_numpy(wav).to(self.device), self.codec.config.sample_rate)
            for k in range(len(quantizers)):
                used[k].update(codes[k].tolist())
        return [round(len(u) / vq.codebook.num_embeddings, 4) for u, vq in zip(used, quantizers)]

    def write_previews(self, step: int) -> float:
        """Reconstructions of the held-out utterances as ``{key}.wav`` and an original-versus-reconstruction
        mel plot ``mel.png`` in ``previews/step-XXXXXX/``; returns their mean mel distance."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = self.preview_dir / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        rate = self.codec.config.sample_rate
        log_mel = LogMel(rate, self.train_cfg.mel_windows[-1], self.train_cfg.mel_bins[-1])
        fig, axes = plt.subplots(len(self.heldout), 2, figsize=(10, 2.5 * len(self.heldout)), squeeze=False)
        for row, (key, wav) in enumerate(self.heldout.items()):
            recon = self.reconstruct(wav)
            sf.write(folder / f"{key}.wav", recon, rate, subtype="PCM_16")
            for col, (title, audio) in enumerate((("original", wav), ("reconstruction", recon))):
                mel = log_mel(torch.from_numpy(audio)[None, None])[0].numpy()  # (M, N)
                axes[row, col].imshow(mel, origin="lower", aspect="auto", cmap="magma")
                axes[row, col].set_title(f"{key}: {title}", fontsize=8)
                axes[row, col].set_axis_off()
        fig.suptitle(f"step {step}")
        fig.tight_layout()
        fig.savefig(folder / "mel.png", dpi=80)
        plt.close(fig)
        return self.heldout_mel_distance()
