"""The training run of one stage: data, the step loop, checkpoints, logs and the export.

What differs between the stages - networks, step inputs, loss, trainable parameters, export names - is the
stage object's (:mod:`pangu_draw_ms.training.stages`); the trainer runs any of them the same way.

Randomness that decides a sample's fate lives on the host and is keyed, never carried: the timestep and
the noises of the sample at global batch position p of micro-batch m come from
``default_rng([seed, m, p])``, caption choices from ``(seed, epoch, sample)``, the batch plan from
``(seed, epoch)``. A run's whole position is therefore (weights, optimizer state, micro-batch count): a
resumed run continues exactly, and N workers with batch b see what one worker with batch N*b sees.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..buckets import BucketTable
from ..config import to_dict
from ..io.model_dir import load_model_config
from ..io.state import cell_state
from ..models.layers import compute_dtype
from ..tokenizers import build_tokenizer
from .checkpointing import CheckpointFolder
from .config import TrainConfig
from .data import UNCOND, BatchPlan, BatchStream, FeatureCache, Skipped, assign_buckets, read_manifest
from .metrics import MetricsLog, plot_loss
from .stages import StepInputs, TrainingStage, build_stage
from .step import TrainStep

logger = logging.getLogger("pangu_draw_ms.train")


def barrier(world: int) -> None:
    """Wait for every rank. A one-element all-reduce: ``comm_func.barrier`` has no CPU kernel in MindSpore
    2.9, the AllReduce primitive runs everywhere, and no rank gets its result before all have sent."""
    if world > 1:
        ops.AllReduce()(Tensor(np.ones(1, np.float32))).asnumpy()


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(cell: nn.Cell) -> str:
    """sha256 over a cell's parameters (sorted by name): equal digests = bit-identical weights."""
    digest = hashlib.sha256()
    for name, value in sorted(cell_state(cell).items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class Trainer:
    """Trains one stage (``config.stage``) on this worker (``rank`` of ``world``); see the module docstring."""

    def __init__(self, config: TrainConfig, rank: int = 0, world: int = 1):
        self.config = config
        self.rank, self.world = rank, world
        self.is_main = rank == 0
        self.model_config = config.model_config(load_model_config(config.model))
        precision = None if config.precision == "auto" else config.precision
        self.dtype = compute_dtype(precision)
        self.checkpoints = CheckpointFolder(os.path.join(config.output_dir, "checkpoints"), config.keep_checkpoints)
        if self.is_main:
            for name in self.checkpoints.remove_partial_files():
                logger.warning("removed %s, left by a save that was interrupted", name)
        self.step = 0
        self.micro = 0
        ms.set_seed(config.seed)  # identical initial weights on every worker
        self.stage: TrainingStage = build_stage(config, self.model_config, self.dtype, self.is_main)
        self.phase = None
        self._enter_phase_of(0)
        scaling = config.loss_scale if self.dtype == ms.float16 else None
        self.train_step = TrainStep(self.stage.loss_fn(), self.stage.trainable_params(), config.optim, config.steps,
                                    scaling, world)

    @property
    def cells(self) -> Dict[str, nn.Cell]:
        """The stage's networks by name."""
        return self.stage.cells

    @property
    def trainable(self) -> List[str]:
        """The names of the networks this run trains (the rest are frozen)."""
        return self.stage.trainable

    # ---- data -----------------------------------------------------------------------------------
    def _enter_phase_of(self, step: int) -> None:
        """Read the data at the bucket list of optimizer step ``step`` (a run has one list, or two with
        Resolution Boost), unless it is already read. The stream of a phase counts micro-batches from the
        phase's first step, so a resumed run sees the same batches."""
        phase = max(first for first in self.config.phases() if first <= step)
        if phase != self.phase:
            self.phase = phase
            self.phase_micro = phase * self.config.optim.grad_accumulation
            self._build_data(self.config.buckets(self.model_config, phase))

    def _build_data(self, sizes) -> None:
        if self.stage.reads_prompt_pairs:
            self._build_pair_data()
            return
        config, data = self.config, self.config.data
        samples, skipped = read_manifest(data.manifest, data.root)
        table = BucketTable(f"{config.stage} buckets", tuple(tuple(size) for size in sizes))
        buckets, left_out = assign_buckets(samples, table, data.upscale_small_images)
        self.skipped = Skipped(skipped + left_out)
        self.samples, self.buckets, self.table = samples, buckets, table
        self.global_batch = data.batch_size * self.world
        self.plan = BatchPlan(buckets, self.global_batch, config.seed)
        if self.is_main:
            counts = {f"{h}x{w}": int((buckets == i).sum()) for i, (h, w) in enumerate(table.sizes)}
            logger.info("data: %d samples in %d buckets %s; skipped: %s; %d global batches of %d per epoch",
                        int((buckets >= 0).sum()), len(table), counts, self.skipped.describe(),
                        self.plan.batches_per_epoch, self.global_batch)
        frozen_text = self.stage.frozen_text
        self.cache = None
        if data.cache_dir and self.stage.frozen_vae:
            fingerprint = self._cache_fingerprint(frozen_text)
            # One subfolder per fingerprint: runs of other bucket lists, data or weights (the two phases of
            # Resolution Boost, the arms of an ablation) share a cache folder without invalidating each other.
            self.cache = FeatureCache(os.path.join(data.cache_dir, fingerprint[:16]), fingerprint)
            self._fill_cache(frozen_text)
        tokenizers = None
        if self.stage.captioned and not (self.cache is not None and frozen_text):
            tokenizers = [build_tokenizer(t) for t in self.stage.tokenizer_configs()]
            for tokenizer in tokenizers:
                tokenizer("warm up")  # loads jieba's dictionary before the decode threads share it
        self.stream = BatchStream(samples, buckets, table, self.plan, rank=self.rank, world=self.world,
                                  batch_size=data.batch_size, seed=config.seed, languages=data.languages,
                                  uncond_prob=data.uncond_prob, tokenizers=tokenizers, cache=self.cache,
                                  cache_text=frozen_text, num_workers=data.num_workers)

    def _build_pair_data(self) -> None:
        """The text pairs of a prompt stage (the stage reads them), batched like images of one bucket: a row
        of ``max_length + 1`` tokens (the table's one size, 1 x tokens)."""
        pairs = self.stage.prompt_pairs(self.phase, self.rank, self.world)
        self.skipped = Skipped()
        self.buckets = np.zeros(len(pairs), np.int64)
        self.table = BucketTable("prompt pairs", ((1, self.stage.enhancer.config.max_length + 1),))
        self.global_batch = self.config.data.batch_size * self.world
        self.plan = BatchPlan(self.buckets, self.global_batch, self.config.seed)
        self.cache = None
        self.stream = self.stage.pair_stream(pairs, self.plan, self.rank, self.config.data.batch_size)
        if self.is_main:
            logger.info("data: %d prompt pairs; %d global batches of %d per epoch", len(pairs),
                        self.plan.batches_per_epoch, self.global_batch)

    def _cache_fingerprint(self, frozen_text: bool) -> str:
        model = to_dict(self.model_config)
        parts = {"manifest": os.path.abspath(self.config.data.manifest), "samples": len(self.samples),
                 "buckets": [list(s) for s in self.table.sizes], "vae": model["vae"],
                 "vae_weights": _file_digest(self.config.init.vae),
                 "languages": list(self.config.data.languages), "dtype": str(self.dtype),
                 "upscale_small_images": self.config.data.upscale_small_images}
        if frozen_text:
            parts["conditioner"] = model["conditioner"]
            parts["conditioner_weights"] = _file_digest(self.config.init.conditioner)
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _fill_cache(self, frozen_text: bool) -> None:
        """Compute the posteriors (and frozen text features) of this worker's share of the samples."""
        cache = self.cache
        if cache.is_valid():
            if self.is_main:
                logger.info("cache: using %s", cache.directory)
            return
        os.makedirs(os.path.join(cache.directory, "latents"), exist_ok=True)
        os.makedirs(os.path.join(cache.directory, "text"), exist_ok=True)
        # Images are read through the stream's decoder (bad files are replaced the same way).
        decoder = BatchStream(self.samples, self.buckets, self.table, self.plan, rank=0, world=1, batch_size=1,
                              seed=self.config.seed, num_workers=1)
        tokenizers = [build_tokenizer(t) for t in self.stage.tokenizer_configs()]
        choices = list(self.config.data.languages) + [UNCOND]
        batch = self.config.data.batch_size
        start = time.time()
        mine = [i for i in np.flatnonzero(self.buckets >= 0) if i % self.world == self.rank]
        for bucket in range(len(self.table)):
            members = [int(i) for i in mine if self.buckets[i] == bucket]
            for first in range(0, len(members), batch):
                chunk = members[first:first + batch]
                pixels = np.stack([decoder.pixels(i, self.table.sizes[bucket]) for i in chunk])
                mean, logvar = self.stage.encode_images(Tensor(pixels))
                moments = np.concatenate([mean.asnumpy(), logvar.asnumpy()], axis=1)
                for i, m in zip(chunk, moments):
                    np.save(cache.latents_path(i), m.astype(np.float32))
                if frozen_text:
                    buckets = Tensor(np.full(len(chunk), bucket, np.int32))
                    features = {}
                    for choice in choices:
                        texts = [self.samples[i].caption(choice) if choice != UNCOND else "" for i in chunk]
                        ids = [Tensor(tokenizer(texts)) for tokenizer in tokenizers]
                        context, vector = self.stage.encode_text(buckets, *ids)
                        features[choice] = (context.asnumpy(), vector.asnumpy())
                    for k, i in enumerate(chunk):
                        np.savez(cache.text_path(i), **{f"{kind}_{choice}": features[choice][j][k]
                                                        for choice in choices
                                                        for j, kind in enumerate(("context", "vector"))})
        barrier(self.world)
        if self.is_main:
            cache.mark_valid()
            logger.info("cache: %d samples encoded into %s in %.0f s", len(mine), cache.directory, time.time() - start)
        barrier(self.world)

    # ---- one micro-batch ------------------------------------------------------------------------
    def _inputs(self, batch: Dict[str, np.ndarray], micro: int) -> StepInputs:
        """The step's input tensors for a micro-batch, and the timesteps it uses (empty for the VAE). The
        sample at global batch position p draws from ``default_rng([seed, micro, p])``."""
        size = len(batch["bucket_index"])
        positions = self.rank * size + np.arange(size)
        rngs = [np.random.default_rng([self.config.seed, micro, int(p)]) for p in positions]
        return self.stage.inputs(batch, rngs)

    def loss_on(self, micro: int) -> float:
        """The loss of this worker's micro-batch ``micro`` (its keyed timesteps and noise) at the current weights."""
        inputs, _ = self._inputs(self.stream.batch(micro - self.phase_micro), micro)
        return float(self.train_step.loss_fn(*inputs).asnumpy())

    # ---- checkpoints ----------------------------------------------------------------------------
    def _run_state(self) -> dict:
        return {"step": self.step, "micro": self.micro, "stage": self.config.stage, "world": self.world,
                "global_batch": self.global_batch, "batches_per_epoch": self.plan.batches_per_epoch,
                "seed": self.config.seed, "trainable": self.trainable}

    def save(self) -> Optional[str]:
        """Write a checkpoint of the run (main worker only)."""
        if not self.is_main:
            return None
        tensors = {f"model/{name}/{k}": v for name in self.trainable
                   for k, v in self.stage.checkpoint_state(name).items()}
        tensors.update(self.train_step.state())
        path = self.checkpoints.save(self.step, tensors, self._run_state())
        logger.info("step %d: checkpoint %s", self.step, path)
        return path

    def _newest_loadable_checkpoint(self):
        """``(path, tensors, state)`` of the newest checkpoint of the output folder that loads, or None. Each
        newer one that does not (damaged or cut off from outside) is skipped with a warning saying why, and
        the main worker renames it ``<name>.damaged``: kept for inspection, out of the rotation of kept files."""
        for step in reversed(self.checkpoints.steps()):
            path = self.checkpoints.path(step)
            try:
                return (path,) + CheckpointFolder.load(path)
            except (ValueError, OSError) as err:  # CheckpointError, bad metadata, unreadable file
                if self.is_main and os.path.exists(path):
                    os.replace(path, path + ".damaged")
                logger.warning("resume: skipped %s, it does not load (%s); kept as %s.damaged", path, err, path)
        return None

    def resume(self, path: Optional[str] = None) -> bool:
        """Continue from checkpoint ``path``, or by default from the newest checkpoint of the output folder that
        loads (newer damaged ones are skipped, with a warning); False if there is none."""
        if path is None:
            found = self._newest_loadable_checkpoint()
            if found is None:
                return False
            path, tensors, state = found
        else:
            tensors, state = CheckpointFolder.load(path)
        # The checkpoint after step k was written with the data of step k - 1 (its phase's batch layout).
        self._enter_phase_of(max(0, int(state.get("step", 0)) - 1))
        expected = self._run_state()
        for key in ("stage", "global_batch", "batches_per_epoch", "seed", "trainable"):
            if state.get(key) != expected[key]:
                raise ValueError(f"checkpoint {path!r} was written with {key}={state.get(key)!r} but this run has "
                                 f"{key}={expected[key]!r}; an exact resume needs the same data and batch layout")
        for name in self.trainable:
            prefix = f"model/{name}/"
            self.stage.load_checkpoint_state(name, {k[len(prefix):]: v for k, v in tensors.items()
                                                    if k.startswith(prefix)}, what=f"{path} ({name})")
        self.train_step.load_state(tensors)
        self.step, self.micro = int(state["step"]), int(state["micro"])
        if self.is_main:
            logger.info("resumed from %s at step %d", path, self.step)
        return True

    # ---- the loop -------------------------------------------------------------------------------
    def train(self, steps: Optional[int] = None) -> dict:
        """Run until optimizer step ``steps`` (default: ``config.steps``); returns a summary."""
        config = self.config
        steps = config.steps if steps is None else steps
        metrics = MetricsLog(config.output_dir, self.step) if self.is_main else None
        progress = None
        if self.is_main:
            from tqdm import tqdm

            progress = tqdm(total=steps, initial=self.step, desc=config.stage, dynamic_ncols=True)
        self._enter_phase_of(self.step)
        stream = self.stream(self.micro - self.phase_micro)
        t_range = self.stage.t_range
        t_seen = [t_range[1], -1] if t_range else None
        start, first_step, losses = time.time(), self.step, []
        while self.step < steps:
            if self.step in self.config.phases() and self.step != self.phase:
                self._enter_phase_of(self.step)
                stream = self.stream(self.micro - self.phase_micro)
                logger.info("step %d: now at the buckets %s", self.step, self.table.sizes)
            tick = time.time()
            step_t = []
            for _ in range(config.optim.grad_accumulation):
                batch = next(stream)
                inputs, timesteps = self._inputs(batch, self.micro)
                result = self.train_step(*inputs)
                self.micro += 1
                step_t.extend(timesteps.tolist())
            self.step += 1
            seconds = time.time() - tick
            row = {"step": self.step, "epoch": self.plan.position(self.micro - 1 - self.phase_micro)[0],
                   "loss": result["loss"],
                   "lr": result["lr"], "grad_norm": result["grad_norm"], "loss_scale": self.train_step.loss_scale,
                   "finite": int(result["finite"]),
                   "samples_per_s": self.global_batch * config.optim.grad_accumulation / seconds,
                   "bucket": int(batch["bucket_index"][0]),
                   "size": "x".join(map(str, self.table.sizes[int(batch["bucket_index"][0])]))}
            if t_range:
                row.update(t_min=min(step_t), t_max=max(step_t))
                t_seen = [min(t_seen[0], row["t_min"]), max(t_seen[1], row["t_max"])]
            losses.append(result["loss"])
            if self.is_main:
                metrics.append(row)
                progress.update(1)
                progress.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}")
                if self.step % config.log_every == 0 or self.step == steps:
                    logger.info("step %d loss %.5f lr %.3e grad_norm %.3f %.1f samples/s", self.step, result["loss"],
                                result["lr"], result["grad_norm"], row["samples_per_s"])
            if config.save_every and self.step % config.save_every == 0 and self.step < steps:
                self.save()
        if progress is not None:
            progress.close()
        elapsed = time.time() - start
        self.save()
        summary = {"stage": config.stage, "steps": self.step, "seconds": round(elapsed, 1),
                   "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None,
                   "steps_per_s": (self.step - first_step) / max(elapsed, 1e-9),
                   "skipped": dict(self.skipped), "replaced_images": self.stream.replaced,
                   "digest": self.digest()}
        if t_range:
            summary["t_seen"] = t_seen
        if self.is_main:
            plot_loss(metrics.path, os.path.join(config.output_dir, "loss.png"), title=f"{config.stage} loss")
            if config.export_dir:
                summary["export"] = self.export()
            with open(os.path.join(config.output_dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2, ensure_ascii=False)
        return summary

    def digest(self) -> str:
        """sha256 over the trainable weights: equal on every worker of a correct data-parallel run."""
        return hashlib.sha256("".join(weights_digest(self.cells[n]) for n in self.trainable).encode()).hexdigest()

    # ---- export ---------------------------------------------------------------------------------
    def latent_std(self, max_samples: int = 512) -> float:
        """Standard deviation of unscaled posterior samples of the training images (what sets scaling_factor)."""
        values: List[np.ndarray] = []
        stream = BatchStream(self.samples, self.buckets, self.table, self.plan, rank=0, world=1,
                             batch_size=self.config.data.batch_size, seed=self.config.seed, num_workers=1)
        rng = np.random.default_rng(self.config.seed)
        for micro in range(min(self.plan.batches_per_epoch, max(1, max_samples // self.config.data.batch_size))):
            mean, logvar = (x.asnumpy() for x in self.stage.encode_images(Tensor(stream.batch(micro)["pixels"])))
            values.append(mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape))
        return float(np.concatenate([v.reshape(-1) for v in values]).std())

    def export(self) -> dict:
        """Write the trained networks (EMA weights) into ``config.export_dir`` as the stage exports them
        (:meth:`TrainingStage.export`; stage ``vae`` measures its scaling factor)."""
        directory = self.config.export_dir
        os.makedirs(directory, exist_ok=True)
        ema = self.train_step.ema_weights()
        states = {}
        for name in self.trainable:
            state = {p.name: ema[p.name] for p in self.cells[name].trainable_params()}
            state.update({k: v for k, v in cell_state(self.cells[name]).items() if k not in state})
            states[name] = state
        written = self.stage.export(directory, states, self.latent_std)
        logger.info("exported to %s: %s", directory, written)
        return written
