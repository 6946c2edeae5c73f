"""LayerDiff trainer (paper §5.1–5.2); its command is `layerdiff train --data SHARDS --out RUN [...]` (cli/train.py).

One process here; `layerdiff train --workers N` runs the same `Trainer` in N DDP workers through Ray
Train. The run folder (a path or any fsspec URL, see `model.training.run_folder`) holds `config.yaml`,
`metrics.jsonl` (one line per optimiser step), `tb/` (TensorBoard), `checkpoint-NNNNNN/` folders (each vouched
for by its `complete.json`) and, at the end, a diffusers-style pipeline folder (`unet/` with the LayerDiff UNet,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json` last).
Before step 1 the data is checked (`model.training.data_check`); Ctrl-C stops after the current step with a
checkpoint. Exit codes: 0 done, 2 bad input/checkpoint, 3 diverged (NaN), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from model.training import checkpoint as ckpt
from model.training.config import TrainConfig, config_to_dict, save_config
from model.training.data import Batch, OrderedBatches, SlotPosition, build_loader
from model.training.data_check import check_training_data
from model.training.ema import EMA
from model.loading import load_sd_components, resolve_sd
from model.training.interrupt import StopRequest, TrainingInterrupted
from model.training.outcome import EXIT_BAD_INPUT, EXIT_DIVERGED, TrainingDiverged, run_with_exit_codes  # noqa: F401
from model.training.run_folder import RunFolder, is_remote, write_pipeline_folder
from model.training.train_step import Generators, LayerDiffObjective, autocast_dtype, pick_device
from model.training import validation
from model.network.unet import LayerDiffUNet

log = logging.getLogger(__name__)

RESUME_IF_ANY = "if-any"  # resume from the newest checkpoint when there is one, else start fresh (Ray retries)
METRICS, TB, CONFIG = "metrics.jsonl", "tb", "config.yaml"


@dataclass
class RunResult:
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimiser step run by this call
    run: str | None = None  # the run folder's path or URL


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _open_truncated(path: Path, step: int, step_of: Callable[[str], int]):
    """Open a per-step log for appending after dropping its lines past `step` (all of them on a fresh run)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and step and step_of(ln) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))
    return open(path, "a")


class Trainer:
    """Train a LayerDiffUNet on MLCID shards; rank 0 writes logs and checkpoints. `setup()` then `train()`."""

    def __init__(
        self,
        config: TrainConfig,
        data: str,
        out_dir: str | Path,
        resume: bool | str | Path = False,
        device: torch.device | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        config.validate()
        self.config, self.data = config, data
        self.run = RunFolder.open(out_dir)
        self.out_dir = self.run.local  # where this process writes; published to `self.run.url` when remote
        self.resume, self.on_step = resume, on_step
        self.rank, self.world_size = _dist()
        self.device = device or pick_device()
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by {self.world_size} workers")
        self.local_batch = config.batch_size // self.world_size
        self.step = 0
        self.samples_seen = 0
        self.batches_consumed = 0
        self.positions: dict[int, SlotPosition] = {}
        self.dropped: Counter[str] = Counter()
        self._keys_file = None
        self._stop = StopRequest()
        self.validation_prompts: list[validation.ValidationPrompt] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg = self.config
        # 0. Fail fast: the data must give a usable sample (else training would wait at step 0 forever).
        check_training_data(self.data, cfg.data)
        # 1. Seeds (model init draws from the global RNG) and the run folder.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        resume_from = self._resume_path()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            save_config(cfg, self.out_dir / CONFIG)
            self.run.publish(CONFIG)
        # 2. Frozen SD parts and the LayerDiff UNet built from SD's UNet.
        amp = autocast_dtype(cfg.mixed_precision, self.device)
        frozen_dtype = amp or torch.float32
        source = resolve_sd(cfg.preset, cfg.pretrained)
        self.components = load_sd_components(source, dtype=torch.float32)
        c = self.components
        unet = LayerDiffUNet.from_unet(c.unet, max_layers=cfg.data.max_layers, **cfg.unet_options)
        c.unet = None  # the plain SD UNet is no longer needed
        if cfg.gradient_checkpointing == "layer_blocks":
            unet.enable_layer_block_checkpointing()
        elif cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.unet = unet.to(self.device).train()
        for frozen in (c.vae, c.text_encoder):
            frozen.requires_grad_(False).eval().to(self.device, frozen_dtype)
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
        self.objective = LayerDiffObjective(c.vae, c.text_encoder, c.tokenizer, noise_scheduler, cfg, self.device, amp)
        self.model = self.unet
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.unet, device_ids=ids)
        # 3. Optimiser (AdamW), constant LR after linear warm-up, optional grad scaler and EMA.
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        warmup = max(0, cfg.warmup_steps)  # not diffusers' get_scheduler: its warm-up runs step 1 at lr 0
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        self.ema = EMA(self.unet, cfg.ema_decay) if cfg.use_ema else None
        self.gens = Generators.seeded(cfg.seed + 1_000_003 * self.rank, self.device)
        # 4. Resume: weights, optimiser, RNG, data positions.
        if resume_from is not None:
            self._load(resume_from)
        # 5. Data: this rank's stream, resumed at its slots' positions and in its round-robin order.
        loader = build_loader(self.data, cfg.data, self.local_batch, seed=cfg.seed, rank=self.rank,
                              world_size=self.world_size, start=self.positions)
        self.batches = OrderedBatches(loader, max(1, cfg.data.num_workers), first=self.batches_consumed)
        if self.is_main:
            self._open_logs()
            if cfg.validation_every:
                self.validation_prompts = (validation.prompts_from_config(cfg.validation_prompts)
                                           or validation.prompts_from_data(self.data, cfg.validation_count,
                                                                           cfg.data.max_layers))
        if cfg.record_keys:
            keys = f"keys-rank{self.rank}.txt"
            if self.step:
                self.run.fetch(keys)
            self._keys_file = _open_truncated(self.out_dir / keys, self.step, lambda ln: int(ln.split("\t", 1)[0]))
        log.info("rank %d/%d on %s: %.1fM trainable parameters, micro-batch %d × accum %d, start step %d",
                 self.rank, self.world_size, self.device, sum(p.numel() for p in params) / 1e6, self.local_batch,
                 cfg.grad_accum, self.step)
        return self

    def _resume_path(self) -> str | None:
        """The checkpoint location to resume from (None: a fresh run)."""
        latest = self.run.latest()
        if self.resume == RESUME_IF_ANY:
            return latest
        if not self.resume:
            if latest is not None:
                raise FileExistsError(f"{self.run.url} already holds {latest.rsplit('/', 1)[-1]}; pass --resume to "
                                      "continue it or choose a new --out")
            return None
        if self.resume is True:
            if latest is None:
                raise ckpt.CheckpointError(f"--resume: no complete checkpoint-* folder in {self.run.url}")
            return latest
        return str(self.resume)

    def _load(self, location: str) -> None:
        path = self.run.fetch_checkpoint(location)
        try:
            state, rng = ckpt.load_checkpoint(path, self.unet, self.optimizer, self.lr_scheduler, self.scaler, self.ema)
        finally:
            if is_remote(location):  # a downloaded copy, never the checkpoint itself
                shutil.rmtree(path, ignore_errors=True)
        workers = max(1, self.config.data.num_workers)
        if state.world_size != self.world_size or state.loader_workers != workers:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written by {state.world_size} worker(s) × {state.loader_workers} loader "
                f"worker(s); this run has {self.world_size} × {workers}: the data position cannot be restored")
        if len(rng) != self.world_size or len(state.data) != self.world_size:
            raise ckpt.CheckpointError(f"checkpoint {path}: per-rank state for {len(rng)} ranks, need {self.world_size}")
        self.gens.load_state(ckpt.restore_rng(rng[self.rank]))
        mine = state.data[self.rank]
        self.positions = {int(k): SlotPosition(*v) for k, v in mine["positions"].items()}
        self.batches_consumed = int(mine["batches"])
        self.dropped = Counter(state.dropped[self.rank] if state.dropped else {})
        self.step, self.samples_seen = state.step, state.samples_seen
        log.info("resumed from %s at step %d (%d samples seen)", location, self.step, self.samples_seen)

    def _open_logs(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.step:
            self.run.fetch(METRICS)  # a remote run's log as published with its checkpoint (truncated below)
        self._metrics = _open_truncated(self.out_dir / METRICS, self.step, lambda ln: json.loads(ln)["step"])
        self._tb = SummaryWriter(str(self.out_dir / TB), purge_step=self.step + 1 if self.step else None)
        if not self.step:
            validation.log_hparams(self._tb, config_to_dict(self.config))

    def publish_logs(self) -> None:
        """Flush this rank's logs and upload them to a remote run folder (rank 0: metrics and TensorBoard)."""
        if self._keys_file is not None:
            self._keys_file.flush()
            self.run.publish(Path(self._keys_file.name).name)
        if self.is_main and getattr(self, "_metrics", None) is not None and not self._metrics.closed:
            self._metrics.flush()
            self._tb.flush()
            self.run.publish(METRICS)
            self.run.publish(TB)

    # -- training ----------------------------------------------------------------------------------------------
    def train(self) -> RunResult:
        """Run optimiser steps until `max_steps`; checkpoints every `checkpoint_every`; final pipeline folder."""
        cfg = self.config
        result = RunResult(step=self.step, run=self.run.url)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.is_main, desc="train", unit="step",
                   dynamic_ncols=True)
        try:
            with self._stop:
                while self.step < cfg.max_steps:
                    metrics = self._optimizer_step()
                    result.losses.append(metrics["loss"])
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.1f}")
                    if self.is_main and cfg.validation_every and self.step % cfg.validation_every == 0:
                        self.validate()
                    if self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if metrics["stop_requested"]:  # every rank agreed (all-reduced): stop with a checkpoint
                        if self.step % cfg.checkpoint_every:
                            self.save_checkpoint()
                        raise TrainingInterrupted(self.step, self.run.location(ckpt.checkpoint_name(self.step)))
            if result.losses and self.step % cfg.checkpoint_every:
                self.save_checkpoint()  # the last step too, so the run can be extended with --resume
            if self.is_main:
                self.save_pipeline()
                self.save_loss_curve()
        finally:
            bar.close()
            self.close()
        result.step = self.step
        return result

    def _consume(self, batch: Batch) -> None:
        self.positions[batch.slot] = batch.position
        self.batches_consumed += 1
        self.dropped.update(batch.dropped)
        if self._keys_file is not None:
            self._keys_file.write("".join(f"{self.step + 1}\t{k}\n" for k in batch.keys))

    def _optimizer_step(self) -> dict[str, Any]:
        cfg = self.config
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        parts = torch.zeros(2, device=self.device)
        for micro in range(cfg.grad_accum):
            batch = next(self.batches)
            self._consume(batch)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (last or self.model is self.unet) else self.model.no_sync()
            with sync:
                loss, part = self.compute_loss(batch)
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach()
            parts += torch.stack([part["image"], part["mask"]])
        # 1. Mean loss over micro-batches and workers; stop every worker together if it is not finite.
        stop = torch.tensor([float(self._stop.requested)], device=self.device)
        stats = torch.cat([torch.cat([total[None], parts]) / cfg.grad_accum, stop])  # (loss, image, mask, stop)
        if self.world_size > 1:
            dist.all_reduce(stats)
            stats[:3] /= self.world_size
        loss_value = float(stats[0])
        if not math.isfinite(loss_value):
            self._diverged(f"loss is {loss_value}")
        # 2. Clip, step, schedule, EMA.
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if self.scaler is None and not math.isfinite(float(norm)):
            self._diverged(f"gradient norm is {float(norm)}")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.unet)
        self.step += 1
        step_samples = cfg.batch_size * cfg.grad_accum
        self.samples_seen += step_samples
        seconds = time.perf_counter() - start
        metrics = {
            "step": self.step, "loss": loss_value, "loss_image": float(stats[1]), "loss_mask": float(stats[2]),
            "lr": lr, "grad_norm": float(norm), "samples_per_s": step_samples / seconds, "samples": self.samples_seen,
            "seconds": seconds, "dropped": dict(self.dropped),
        }  # fmt: skip
        self._log(metrics)
        return {**metrics, "stop_requested": bool(stats[3] > 0)}

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch (hook for tests and subclasses)."""
        return self.objective.loss(self.model, batch, self.gens)

    def _diverged(self, what: str) -> None:
        last = self.run.latest()
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: {what}. Stopped without saving; last good checkpoint: "
            f"{last if last is not None else 'none (no checkpoint was written yet)'}. Lower the lr, enable "
            "gradient clipping (max_grad_norm) or check the data."
        )

    def _log(self, metrics: dict[str, Any]) -> None:
        if self.on_step is not None:
            self.on_step(metrics)
        if not self.is_main:
            return
        self._metrics.write(json.dumps(metrics) + "\n")
        self._metrics.flush()
        if self.step % self.config.log_every == 0 or self.step == 1:
            for k in ("loss", "loss_image", "loss_mask", "lr", "grad_norm", "samples_per_s"):
                self._tb.add_scalar(f"train/{k}", metrics[k], self.step)
            for reason, n in metrics["dropped"].items():
                self._tb.add_scalar(f"data/dropped_{reason}", n, self.step)

    def validate(self) -> str | None:
        """Rank 0: sample the validation prompts with the current (EMA) weights; grid → TensorBoard and PNG."""
        if not self.validation_prompts:
            return None
        cfg, start = self.config, time.perf_counter()
        image = validation.sample_grid(self.components, self.unet, self.ema, self.validation_prompts,
                                       cfg.validation_size or cfg.data.resolution, cfg.validation_steps, cfg.seed,
                                       autocast_dtype(cfg.mixed_precision, self.device))  # (H, W, 3) uint8
        self._tb.add_image("validation/samples", image, self.step, dataformats="HWC")
        name = validation.save_png(image, self.out_dir, self.step)
        self.run.publish(name)
        log.info("validation samples at step %d: %s (%.1f s)", self.step, self.run.location(name),
                 time.perf_counter() - start)
        return name

    def save_loss_curve(self) -> None:
        """Rank 0: `loss.png` in the run folder, every logged step (for the model card)."""
        self._metrics.flush()
        validation.loss_curve_from(self.out_dir / METRICS).save(self.out_dir / validation.LOSS_CURVE)
        self.run.publish(validation.LOSS_CURVE)

    # -- saving ------------------------------------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def save_checkpoint(self) -> str | None:
        """All ranks contribute their RNG and data state; rank 0 writes `checkpoint-NNNNNN/` (tmp → rename; remote:
        logs first, then the files, `complete.json` last) and returns its location."""
        mine = {"positions": {str(k): [v.epoch, v.index] for k, v in self.positions.items()},
                "batches": self.batches_consumed}
        rng = self._gather(ckpt.capture_rng(self.gens.state()))
        data = self._gather(mine)
        dropped = self._gather(dict(self.dropped))
        path = None
        if self.is_main:
            state = ckpt.TrainState(step=self.step, samples_seen=self.samples_seen, world_size=self.world_size,
                                    loader_workers=max(1, self.config.data.num_workers), data=data, dropped=dropped,
                                    config=config_to_dict(self.config))
            local = ckpt.save_checkpoint(ckpt.checkpoint_path(self.out_dir, self.step), self.unet, self.optimizer,
                                         self.lr_scheduler, self.scaler, self.ema, state, rng)
        self.publish_logs()  # before the checkpoint: a resumed run's log then always reaches its step
        if self.is_main:
            self.run.publish(local.name)
            if self.run.remote:
                shutil.rmtree(local, ignore_errors=True)  # staging keeps no checkpoint copies
            self.run.prune(self.config.keep_checkpoints)
            path = self.run.location(local.name)
            log.info("saved %s", path)
        if self.world_size > 1:
            dist.barrier()
        return path

    def save_pipeline(self) -> str:
        """Write the final diffusers-style pipeline folder into the run folder (model_index.json last)."""
        from model.hub import card_info_from_training, write_run_files

        if self.ema is not None:
            self.ema.copy_to(self.unet)  # the sampler gets the averaged weights
        c = self.components
        write_pipeline_folder(self.run, {"unet": self.unet, "vae": c.vae.to(torch.float32),
                                         "text_encoder": c.text_encoder.to(torch.float32), "tokenizer": c.tokenizer,
                                         "scheduler": c.scheduler})
        info = card_info_from_training(self.config, self.data, self.step, self.run.local)
        for name in write_run_files(self.run.local, info):  # card, entry file, model_index.json last
            self.run.publish(name)
        log.info("wrote pipeline folder %s (unet %s)", self.run.url, "EMA" if self.ema else "last step")
        return self.run.url

    def close(self) -> None:
        """Stop the data stream, publish and close the logs, remove a remote run's staging folder."""
        self.batches = None  # finish the data stream's generators now, not at interpreter shutdown
        self.publish_logs()
        for f in (getattr(self, "_metrics", None), self._keys_file):
            if f is not None and not f.closed:
                f.close()
        tb = getattr(self, "_tb", None)
        if tb is not None:
            tb.close()
        self.run.close()
