"""VAE reconstruction: train a pipeline's ``AutoencoderKLQwenImage`` on curated images.

Loss ``l1 * |x - D(z)| + l2 * (x - D(z))^2 + edge * |grad x - grad D(z)| + kl * KL(q(z|x) || N(0, I))``
with ``z`` sampled from the posterior (``grad``: horizontal and vertical pixel differences, which
L1/L2 alone leave blurred: thin strokes such as text). After the last step, the trained encoder
runs over ``stats_batches`` more batches on every rank; the per-channel mean and standard
deviation of the posterior means (all ranks together) become the exported VAE's ``latents_mean`` /
``latents_std``, so that the latents the adapter hands to the transformer are normalised. The
export is the whole pipeline directory with the new VAE in it.

``train_encoder: false`` fine-tunes the decoder alone. The encoder, and so the latent space and
its ``latents_mean`` / ``latents_std``, stay exactly as they were: every transformer and every
shard made with the old VAE keeps working, and only what the latents decode to gets better. The KL
term then has no gradient and is left out of the loss (it is still logged as ``kl``).

``anchor_weight`` (with the encoder trained) adds ``anchor * mean(((m - m0) / latents_std)^2)``:
``m0`` is the posterior mean of a frozen copy of the init's encoder, so the latent space may move
only as far as the reconstruction needs (in the units the transformer sees). Transformers made on
the old latents then need a short fine-tune, not a new training from scratch. Measuring new
``latents_mean`` / ``latents_std`` on the fine-tune's data would shift the normalised latents
anyway (by up to 0.12 std on a text-heavy mix, session 15): ``keep_latent_stats`` keeps the init's.

Batches are :class:`ImageRows` (decoded images per row), so the local launcher's
``data.device_cache_mb`` can decode every image once onto the GPU: on a lent H200 the PNG decoding of
each step, on one host process, held the step at ~13 per second (docs/performance.md, session 16).
"""

from __future__ import annotations

import copy
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator

from fewstep.config import StrictModel
from trainer.objectives.base import ModelSpec, Objective, ObjectiveEnv, OptimizerConfig, TrainState
from trainer.teachers.init import InitConfig, prepare_pipeline_dir

log = logging.getLogger(__name__)


class VAEConfig(StrictModel):
    init: InitConfig
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=5e-4))
    resolution: int | None = Field(None, ge=8, description="Training image side (default: the pipeline's).")
    l1_weight: float = Field(1.0, ge=0)
    l2_weight: float = Field(0.0, ge=0)
    kl_weight: float = Field(1e-6, ge=0)
    edge_weight: float = Field(0.0, ge=0, description="L1 on horizontal and vertical pixel differences "
                                                          "(keeps thin strokes such as text sharp).")
    train_encoder: bool = Field(True, description="false: fine-tune the decoder only, keeping the latent "
                                                  "space (and every transformer trained on it) unchanged.")
    anchor_weight: float = Field(0.0, ge=0, description="Keep the encoder's latents near the init encoder's: "
                                                            "weight of their mean squared distance in "
                                                            "latents_std units (needs train_encoder: true).")
    keep_latent_stats: bool = Field(False, description="true: keep the init VAE's latents_mean/std instead of "
                                                       "measuring them on this run's data (with anchor_weight, "
                                                       "so the transformers' normalisation does not move).")
    use_source_images: bool = Field(True, description="Also train on edit rows' source images.")
    stats_batches: int = Field(16, ge=1, description="Batches per rank that set latents_mean/std after training.")

    @model_validator(mode="after")
    def _anchor_needs_encoder(self) -> VAEConfig:
        if self.anchor_weight > 0 and not self.train_encoder:
            raise ValueError("objective.anchor_weight: anchors a trained encoder to its init; with "
                             "train_encoder: false the latents cannot move. Set anchor_weight: 0 or "
                             "train_encoder: true")
        if self.keep_latent_stats and self.init.source != "pretrained":
            raise ValueError("objective.keep_latent_stats: keeps the init VAE's measured latents_mean/std, "
                             "but a tiny-config init has none (they would stay 0 and 1); set it false "
                             "or start from a pretrained pipeline")
        return self

    @property
    def measures_latent_stats(self) -> bool:
        """Whether the run ends by measuring new latents_mean/std (a moved encoder, not kept)."""
        return self.train_encoder and not self.keep_latent_stats


class VAEReconstruction(torch.nn.Module):
    """Forward = encode, reparameterised sample with given noise, decode (one image frame).

    With ``anchor``, a frozen copy of the encoder as it is now also encodes the batch; forward then
    returns its posterior mean too (else ``None``).
    """

    def __init__(self, vae: torch.nn.Module, train_encoder: bool = True, anchor: bool = False):
        super().__init__()
        self.vae = vae
        self.train_encoder = train_encoder
        if not train_encoder:
            for part in (vae.encoder, vae.quant_conv):
                part.requires_grad_(False)
        self.anchor_encoder: torch.nn.Module | None = None
        if anchor:
            # The whole VAE is copied (1.9 M parameters at tiny scale) so that its own ``encode``,
            # with its causal-conv cache handling, defines the anchor; the copy's decoder is unused.
            self.anchor_encoder = copy.deepcopy(vae).requires_grad_(False).eval()

    def forward(self, images: torch.Tensor, noise: torch.Tensor):
        frames = images[:, :, None]
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(frames).latent_dist
        mean, logvar = posterior.mean, posterior.logvar
        z = mean + torch.exp(0.5 * logvar) * noise[:, :, None].to(mean)
        recon = self.vae.decode(z, return_dict=False)[0]
        anchor_mean = None
        if self.anchor_encoder is not None:
            with torch.no_grad():
                anchor_mean = self.anchor_encoder.encode(frames).latent_dist.mean[:, :, 0]
        return recon[:, :, 0], mean[:, :, 0], logvar[:, :, 0], anchor_mean


def edge_l1(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical pixel differences of two image batches."""
    dx = (recon[..., :, 1:] - recon[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (recon[..., 1:, :] - recon[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def decode_png(data: bytes, size: int) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


@dataclass
class ImageRows:
    """The decoded images of a batch of curated rows: each row's image and, for edit rows, its source.

    ``stacked()`` is what a training step sees: the rows' images, then their sources (rows without
    one skipped). ``select`` keeps that order, so a cached dataset and per-batch decoding train alike.
    """

    targets: torch.Tensor  # [R, 3, H, W] in [-1, 1]; zeros where a row has no image
    has_target: torch.Tensor  # [R] bool
    sources: torch.Tensor | None  # [R, 3, H, W] or None when no row is an edit (or sources are off)
    has_source: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def select(self, index) -> ImageRows:
        index = torch.as_tensor(np.asarray(index), dtype=torch.long, device=self.targets.device)
        sources = None if self.sources is None else self.sources[index]
        has_source = None if self.has_source is None else self.has_source[index]
        return ImageRows(self.targets[index], self.has_target[index], sources, has_source)

    def stacked(self) -> torch.Tensor:
        parts = [self.targets[self.has_target]]
        if self.sources is not None:
            parts.append(self.sources[self.has_source])
        images = torch.cat(parts)
        if images.shape[0] == 0:
            raise ValueError("data: a batch of curated rows without any image: the VAE needs image rows "
                             "(use a curated set with images, not prompt-only)")
        return images


def _decode_column(values, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    present = [data is not None for data in values]
    blank = np.zeros((size, size, 3), np.float32)
    arrays = [decode_png(bytes(data), size) if data is not None else blank for data in values]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device)
    return images, torch.tensor(present, dtype=torch.bool, device=device)


class VAEObjective(Objective):
    """Trains the VAE of a pipeline (curated images, not shards)."""

    name = "vae"
    progress_keys = ("loss", "psnr", "samples_per_s")
    selectable_batches = True  # ImageRows.select; collate passes ImageRows through
    Config = VAEConfig
    data_kind = "curated"
    columns = ("id", "task", "category", "image", "source_image")

    def __init__(self, config: VAEConfig, env: ObjectiveEnv):
        super().__init__(config, env)
        self.config: VAEConfig = config
        self.pipeline_uri = prepare_pipeline_dir(config.init, env.work_dir, env.storage)
        from fewstep.models.adapter import QwenImageAdapter

        self.adapter = QwenImageAdapter.load(self.pipeline_uri, components=("vae",), device="cpu",
                                             storage=env.storage)
        multiple = self.adapter.vae_scale_factor * 2
        self.resolution = int(config.resolution or self.adapter.resolution or 64)
        if self.resolution % multiple:
            raise ValueError(f"objective.resolution: {self.resolution} must be a multiple of {multiple}")
        channels = self.adapter.latent_channels
        self.anchor_std = self._anchor_std(channels) if config.anchor_weight > 0 else None
        self.stats = {"sum": torch.zeros(channels, dtype=torch.float64),
                      "sumsq": torch.zeros(channels, dtype=torch.float64),
                      "count": torch.zeros((), dtype=torch.float64)}

    def _anchor_std(self, channels: int) -> torch.Tensor:
        """The init VAE's per-channel latents_std: the unit the anchor measures drift in."""
        std = getattr(self.adapter.vae.config, "latents_std", None)
        if std is None or len(std) != channels:
            raise ValueError("objective.anchor_weight: the init VAE has no latents_std for its "
                             f"{channels} latent channels; anchor a trained VAE (one whose training "
                             "wrote latents_mean/std), or set anchor_weight: 0")
        return torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)

    def describe(self) -> str:
        part = "VAE" if self.config.train_encoder else "VAE decoder (encoder frozen)"
        if self.config.anchor_weight > 0:
            part += f" (latents anchored to the init's, weight {self.config.anchor_weight:g})"
        return f"{part} reconstruction at {self.resolution}px"

    def model_specs(self) -> list[ModelSpec]:
        cfg = self.config
        return [ModelSpec("vae", build=lambda: VAEReconstruction(self.adapter.vae, cfg.train_encoder,
                                                                anchor=cfg.anchor_weight > 0),
                          trainable=True, optimizer=cfg.optimizer)]

    def collate(self, rows: dict[str, np.ndarray] | ImageRows, device: torch.device) -> ImageRows:
        if isinstance(rows, ImageRows):
            return rows  # selected from the device cache: decoded already
        targets, has_target = _decode_column(rows["image"], self.resolution, device)
        sources = has_source = None
        if self.config.use_source_images and "source_image" in rows:
            if any(data is not None for data in rows["source_image"]):
                sources, has_source = _decode_column(rows["source_image"], self.resolution, device)
        return ImageRows(targets, has_target, sources, has_source)

    def train_step(self, state: TrainState, rows: ImageRows) -> dict[str, float]:
        handle = state.models["vae"]
        cfg = self.config
        batch = rows.stacked()
        b, _, h, w = batch.shape
        f = self.adapter.vae_scale_factor
        noise = torch.randn((b, self.adapter.latent_channels, h // f, w // f), generator=state.generator)
        with state.autocast():
            recon, mean, logvar, anchor_mean = handle.net(state.cast(batch), state.cast(noise))
        recon, mean, logvar = recon.float(), mean.float(), logvar.float()
        diff = recon - batch
        l1 = diff.abs().mean()
        l2 = diff.pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2
        if cfg.train_encoder:  # a frozen encoder's KL has no gradient: it would only offset the loss
            loss = loss + cfg.kl_weight * kl
        metrics = {}
        if cfg.edge_weight > 0:
            edge = edge_l1(recon, batch)
            loss = loss + cfg.edge_weight * edge
            metrics["edge"] = float(edge.detach())
        if anchor_mean is not None:
            drift = ((mean - anchor_mean.float()) / self.anchor_std.to(mean)).pow(2).mean()
            loss = loss + cfg.anchor_weight * drift
            metrics["latent_drift"] = float(drift.detach())
        handle.backward(loss)
        stepped = handle.step()
        psnr = -10.0 * torch.log10(l2.detach() / 4.0 + 1e-12)  # images span [-1, 1]: peak-to-peak 2
        return {"loss": float(loss.detach()), "l1": float(l1.detach()), "mse": float(l2.detach()),
                "kl": float(kl.detach()), "psnr": float(psnr), **metrics, **stepped}

    @torch.no_grad()
    def finalize(self, state: TrainState) -> None:
        """Latent statistics of the final encoder (collective: every rank pulls the same batches)."""
        if not self.config.measures_latent_stats:
            return  # the encoder did not change, or the init's statistics are kept on purpose
        if state.next_batch is None:
            raise RuntimeError("the VAE objective needs state.next_batch to gather latent statistics")
        handle = state.models["vae"]
        for _ in range(self.config.stats_batches):
            batch = state.next_batch().stacked()
            b, _, h, w = batch.shape
            f = self.adapter.vae_scale_factor
            zeros = torch.zeros((b, self.adapter.latent_channels, h // f, w // f))
            with state.autocast():
                _, mean, _, _ = handle.net(state.cast(batch), state.cast(zeros))
            m = mean.detach().double().cpu()
            self.stats["sum"] += m.sum(dim=(0, 2, 3))
            self.stats["sumsq"] += m.pow(2).sum(dim=(0, 2, 3))
            self.stats["count"] += m.shape[0] * m.shape[2] * m.shape[3]
        if state.world_size > 1 and torch.distributed.is_initialized():
            for key in ("sum", "sumsq", "count"):
                value = self.stats[key].to(state.device)  # NCCL reduces device tensors only
                torch.distributed.all_reduce(value)
                self.stats[key] = value.cpu()

    def latent_statistics(self) -> tuple[list[float], list[float]]:
        count = float(self.stats["count"])
        if count <= 0:
            raise RuntimeError("no latent statistics gathered (finalize did not run)")
        mean = self.stats["sum"] / count
        var = (self.stats["sumsq"] / count - mean.pow(2)).clamp_min(1e-8)
        return [float(v) for v in mean], [float(v) for v in var.sqrt()]

    def export(self, state: TrainState, out_dir: Path) -> None:
        vae = state.models["vae"].module.vae
        if next(vae.parameters()).dtype != torch.float32:
            vae = copy.deepcopy(vae).float()
        if self.config.measures_latent_stats:
            mean, std = self.latent_statistics()
            vae.register_to_config(latents_mean=mean, latents_std=std)
            log.info("VAE latents_mean %s latents_std %s", np.round(mean, 3).tolist(), np.round(std, 3).tolist())
        self.adapter.vae = vae
        if self.adapter.meta.get("role"):
            # A VAE fine-tuned inside a teacher or a student: the pipeline keeps its role (a
            # student stays a 4-step student for eval) and the transformer's own step count.
            meta = {"vae_trained_steps": state.step, "vae_resolution": self.resolution}
        else:
            meta = {"role": "vae", "trained_steps": state.step, "vae_resolution": self.resolution}
        self.adapter.save_pipeline(str(out_dir), extra_meta=meta)
