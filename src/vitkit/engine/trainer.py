"""The training loop: one code path for one process or many (``torchrun``), any task, any model.

What it guarantees:

* **Exact resume.** Data order comes from a sampler seeded by (seed, epoch), augmentation randomness from
  the global RNG whose state is checkpointed, and a mid-epoch checkpoint records how many steps of the
  epoch are done; ``resume`` replays nothing and skips exactly those batches.
* **Same result on N processes** as on one with the same global batch: every process takes an interleaved
  shard of the same permutation, so step k sees the same images in total, and DDP averages gradients.
* **Crash safety.** Checkpoints are swapped in atomically (:mod:`.checkpoint`); ``--resume RUN`` continues
  in RUN wherever it was moved, cuts ``metrics.jsonl`` back to the checkpoint's history (no duplicate epochs
  after a kill), and removes what interrupted checkpoint writes left. A NaN or infinite loss stops the run
  with a :class:`~vitkit.errors.TrainingError` before anything is saved over the last good checkpoint.
* Rank 0 alone prints, writes ``metrics.jsonl``, plots and checkpoints.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import time
from contextlib import ExitStack, nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm.auto import tqdm

from ..data import batch_collate, build_dataset
from ..errors import CheckpointError, ConfigError, TrainingError
from ..models import load_weights, model_defaults
from ..tasks import Task, TaskContext, build_task, scalar_metrics, to_device
from ..utils import atomic_write_json, atomic_write_text
from .checkpoint import (
    read_ema_state,
    read_train_state,
    remove_stale,
    resolve,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from .config import RunConfig, config_to_dict, config_to_yaml, load_config
from .distributed import (
    DistInfo,
    all_gather_with_grad,
    all_reduce_sum,
    autocast_dtype,
    barrier,
    cleanup,
    gather_object,
    init_distributed,
    loader_settings,
)
from .fsdp import all_finite, check_strategy, gathered, load_sharded, prepare_model, save_sharded
from .loggers import Loggers, open_loggers
from .optim import build_ema, build_optimizer, build_scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _ddp(model: nn.Module) -> DistributedDataParallel:
    """The DDP wrapper inside a possibly compiled training model (for ``no_sync``)."""
    return getattr(model, "_orig_mod", model)


class _StepLoop:
    """The trainer's side of one optimizer step (see :class:`vitkit.tasks.base.StepLoop`)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.model = trainer.train_model
        self.optimizers = trainer.optimizers
        self.grad_accum = trainer.cfg.train.grad_accum
        self.bad_loss: float | None = None  # the first non-finite loss of this step

    def forward_context(self, last_micro_batch: bool):
        t = self.trainer
        # (FSDP reduce-scatters every micro-batch into its sharded gradients: nothing to defer)
        sync = nullcontext() if last_micro_batch or not t.dist.enabled or t.fsdp else _ddp(t.train_model).no_sync()
        stack = ExitStack()
        stack.enter_context(sync)
        stack.enter_context(t._autocast())
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        if self.bad_loss is None:
            value = float(loss.detach())  # tasks already read it (loss.item()) for their statistics
            if not math.isfinite(value):
                self.bad_loss = value
        (loss / self.grad_accum).backward()

    def step(self, name: str = "model") -> dict[str, float]:
        t = self.trainer
        optimizer = t.optimizers[name]
        stats: dict[str, float] = {}
        if t.cfg.optim.clip_grad:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = float(nn.utils.clip_grad_norm_(params, t.cfg.optim.clip_grad))
            stats["step_grad_norm" if name == "model" else f"step_grad_norm_{name}"] = norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t.schedulers[name].step()
        if name == "model" and t.ema is not None:
            t.ema.update_parameters(t.model)
        return stats


class Trainer:
    """Build everything a run needs from a :class:`RunConfig`, then :meth:`fit`.

    The trainer never looks inside a batch or a metric: the task (``cfg.task``) turns batches into losses,
    evaluates, names its primary metric and the direction that picks the ``best`` checkpoint.
    """

    def __init__(self, cfg: RunConfig, resume: str | Path | None = None, dist: DistInfo | None = None) -> None:
        self.cfg = cfg
        self.dist = dist or init_distributed(cfg.train.device)
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        seed_everything(cfg.train.seed)
        t, world = cfg.train, self.dist.world_size
        if t.batch_size % (world * t.grad_accum):
            raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by processes ({world}) x "
                              f"train.grad_accum ({t.grad_accum})")
        self.micro_batch = t.batch_size // (world * t.grad_accum)

        source_train, source_eval, source_test = self._build_data()
        info = self.dist
        ctx = TaskContext(augment=cfg.augment, device=info.device, rank=info.rank, world_size=info.world_size,
                          all_gather=lambda t: all_gather_with_grad(t, info),
                          all_reduce_sum=lambda t: all_reduce_sum(t, info), autocast=self._autocast,
                          train_set=source_train, eval_set=source_eval, eval_batch_size=t.eval_batch_size,
                          collate=batch_collate, progress=t.progress)  # evaluation shows a bar like training
        self.task: Task = build_task(cfg.task.name, cfg.task.args, ctx)
        self.train_set = self.task.train_dataset(source_train)
        self.eval_set = self.task.eval_dataset(source_eval)
        # with a validation split: the test set, read once after the last epoch
        self.test_set = self.task.eval_dataset(source_test) if source_test is not None else None
        self._source_test = source_test  # what ctx.eval_set is while the test set is evaluated (probes read it)
        self.test_metrics: dict[str, Any] | None = None
        self.model = self.task.build_model(cfg.model).to(self.dist.device)
        self.model.pretrained_cfg = {**self.model.pretrained_cfg, "task": self.task.name}
        # model.name, or (a checkpoint's own architecture) the name it was saved or converted under
        self.model_title = cfg.model.name or getattr(self.model, "model_name", None) or type(self.model).__name__
        self.task.setup(self.model)
        # train.strategy=fsdp: sharded checkpoints (any process count resumes them); with torchrun, sharded model
        self.fsdp = t.strategy == "fsdp"
        prepare_model(self.model, t.strategy, t.activation_checkpointing, self.dist, self.bf16)
        seed_everything(cfg.train.seed + 1000 * self.dist.rank)  # per-process augmentation streams

        self.steps_per_epoch = len(self.train_set) // (self.micro_batch * world * t.grad_accum)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size={t.batch_size} is larger than the training set "
                              f"({len(self.train_set)} images)")
        self.optimizers = self.task.build_optimizers(self.model, lambda m: build_optimizer(m, cfg.optim))
        if "model" not in self.optimizers:
            raise ConfigError(f"task {self.task.name!r}: build_optimizers must name one optimizer 'model'")
        self.schedulers = {name: build_scheduler(opt, cfg.schedule, opt.defaults["lr"], self.steps_per_epoch,
                                                 t.epochs) for name, opt in self.optimizers.items()}
        self.optimizer, self.scheduler = self.optimizers["model"], self.schedulers["model"]
        self.ema = build_ema(self.model, t.ema_decay) if t.ema_decay else None
        self.train_model: nn.Module = self.model
        if self.dist.enabled and not self.fsdp:
            self.train_model = DistributedDataParallel(self.model)
        if t.compile:
            self.train_model = torch.compile(self.train_model)

        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.epoch_totals: dict[str, float] = {}  # statistics of the current epoch so far (kept across resume)
        self._saved_totals: dict[str, float] = {}  # their sum over processes at the latest save (_global_totals)
        self._saved_rngs: list[dict[str, Any]] | None = None  # every process's RNG state at that save (torchrun)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}  # {"epoch": ..., <scalar metrics of that evaluation>}
        self.last_eval: dict[str, Any] | None = None  # the latest evaluation, with non-scalar values
        self.wall_clock = 0.0
        self.saved_step: int | None = None  # the step of the latest checkpoints/last (for error messages)
        self.loggers = Loggers()  # train.loggers: opened by fit, on rank 0 only
        if resume is not None:
            self._resume(Path(resume))
        # Leftovers of crashed checkpoint writes (whole temporary copies) go, once resume had its chance to
        # use one; remove_stale never deletes the only complete copy.
        barrier(self.dist)
        if self.dist.is_main:
            for path in remove_stale(self.ckpt_dir):
                self._log(f"removed {path}, left by an interrupted checkpoint write")

    # ------------------------------------------------------------------ set-up
    def _build_data(self):
        cfg, m = self.cfg, self.cfg.model
        defaults = model_defaults(m.name) if m.name else {}
        channels = m.args.get("in_chans", defaults.get("in_chans"))
        size = self.cfg.data.image_size
        common = dict(data_dir=cfg.data.data_dir, image_size=size, num_channels=channels,
                      max_bad_images=cfg.data.max_bad_images)
        extra = {"root": cfg.data.root} if cfg.data.root else {}
        extra.update(cfg.data.args)
        if cfg.data.name == "image_folder":
            extra["check"] = cfg.data.verify
        download = cfg.data.download and self.dist.is_main
        if self.dist.enabled and self.dist.is_main:  # rank 0 downloads first, the others wait and then read
            build_dataset(cfg.data.name, "train", download=download, **common, **extra)
        barrier(self.dist)
        train = build_dataset(cfg.data.name, "train", download=download, **common, **extra)
        if cfg.data.eval_split is None and cfg.data.val_fraction == 0:
            raise ConfigError("data.eval_split=null (no evaluation split) needs data.val_fraction > 0, so that "
                              "there is a validation split to evaluate on")
        evals = (build_dataset(cfg.data.name, cfg.data.eval_split, download=download, **common, **extra)
                 if cfg.data.eval_split is not None else None)
        test = None
        if cfg.data.val_fraction > 0:
            if not hasattr(train, "split_off"):
                raise ConfigError(f"data.val_fraction: the {cfg.data.name!r} dataset cannot hold out a validation "
                                  "split (its dataset class has no split_off); leave data.val_fraction at 0")
            test, (train, evals) = evals, train.split_off(cfg.data.val_fraction, seed=cfg.data.val_seed)
        elif cfg.data.test_split is not None:
            test = build_dataset(cfg.data.name, cfg.data.test_split, download=download, **common, **extra)
        if cfg.data.train_fraction < 1:
            train = train.subset(cfg.data.train_fraction, seed=cfg.train.seed)
        return train, evals, test

    @property
    def bf16(self) -> bool:
        """Whether this run autocasts to bf16 (``train.bf16: auto`` decides by the hardware)."""
        return autocast_dtype(self.dist.device, self.cfg.train.bf16) is not None

    def _autocast(self):
        dtype = autocast_dtype(self.dist.device, self.cfg.train.bf16)
        return nullcontext() if dtype is None else torch.autocast(self.dist.device.type, dtype=dtype)

    # ------------------------------------------------------------------ checkpoints
    def _train_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "epoch_totals": json.dumps(self._saved_totals),
            "optimizers": {} if self.fsdp else {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "history": json.dumps(self.history), "best": json.dumps(self.best), "rng": rng_state(),
            # each process's own augmentation stream, so that every rank (not only rank 0) resumes exactly
            **({"rng_per_rank": self._saved_rngs} if self._saved_rngs else {}),
            "wall_clock": self.wall_clock, "world_size": self.dist.world_size,
        }

    def save(self, name: str = "last", model: nn.Module | None = None, with_state: bool = True) -> Path | None:
        model = model or self.model
        # A good checkpoint is never replaced by non-finite weights (a NaN gradient with a finite loss). DDP
        # keeps the replicas identical, so every process comes to the same answer without communicating.
        if not all_finite(model.parameters(), self.dist):  # sharded: each process checks its shard, all agree
            self._stop_non_finite(f"the weights became non-finite after step {self.step} (epoch {self.epoch + 1}/"
                                  f"{self.cfg.train.epochs})")
        if name == "last":
            self.saved_step = self.step
        if with_state:
            self._saved_totals = self._global_totals()  # collective: before rank 0 goes on alone
            self._saved_rngs = gather_object(rng_state(), self.dist)  # collective too
        if self.fsdp:  # every process writes its shards; rank 0 the consolidated weights, and swaps it in
            extra = {"train_config.yaml": config_to_yaml(self.cfg)}
            return save_sharded(self.ckpt_dir / name, model, self.optimizers if with_state else None,
                                self._train_state() if with_state else None, extra, self.dist)
        if not self.dist.is_main:
            return None
        ema_state = self.ema.state_dict() if self.ema is not None and with_state else None
        path = write_checkpoint(self.ckpt_dir / name, model, self._train_state() if with_state else None,
                                ema_state, {"train_config.yaml": config_to_yaml(self.cfg)})
        remove_stale(self.ckpt_dir)  # e.g. the temporary copy this run resumed from, now superseded
        return path

    def _resume(self, folder: Path) -> None:
        folder = resolve(checkpoint_target(folder))
        from ..models import read_state_dict

        check_strategy(folder, self.cfg.train.strategy)
        state = read_train_state(folder)
        if self.fsdp:  # DCP re-shards: any process count continues (the global batch of each step is the same)
            load_sharded(folder, self.model, self.optimizers, state)
        else:
            load_weights(self.model, read_state_dict(folder / "model.safetensors"), source=str(folder))
        if state.get("world_size", 1) != self.dist.world_size and not self.fsdp:
            raise CheckpointError(f"{folder} was written by {state.get('world_size')} processes, resuming with "
                                  f"{self.dist.world_size}: the data order would differ")
        optimizers = state.get("optimizers") or {"model": state["optimizer"]}  # older checkpoints: one optimizer
        schedulers = state.get("schedulers") or {"model": state["scheduler"]}
        if set(optimizers) != set(self.optimizers):
            raise CheckpointError(f"{folder} holds optimizers {sorted(optimizers)}, the task builds "
                                  f"{sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            if not self.fsdp:  # (load_sharded did)
                opt.load_state_dict(optimizers[name])
            self.schedulers[name].load_state_dict(schedulers[name])
        if self.ema is not None:
            ema_state = read_ema_state(folder)
            if ema_state is None:
                raise CheckpointError(f"{folder} has no ema.safetensors but train.ema_decay is set")
            self.ema.load_state_dict(ema_state)
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.history, self.best = json.loads(state["history"]), json.loads(state["best"])
        # the epoch's statistics so far, summed over the processes that wrote them (step_* per process): rank 0
        # carries them on, scaled to this run's process count, so the epoch's record is the same for any count
        totals = json.loads(state["epoch_totals"])
        self.epoch_totals = {k: v * self.dist.world_size if k.startswith("step_") else v
                             for k, v in totals.items()} if self.dist.is_main else {}
        if state.get("world_size", 1) != self.dist.world_size:
            self._log(f"re-sharding: {folder} was written by {state.get('world_size')} process(es), continuing "
                      f"with {self.dist.world_size} (the same global batch per step)")
        self.wall_clock = state["wall_clock"]
        per_rank = state.get("rng_per_rank")  # older checkpoints hold rank 0's state only
        exact = per_rank is not None and len(per_rank) == self.dist.world_size
        set_rng_state(per_rank[self.dist.rank] if exact else state["rng"])
        self.saved_step = self.step
        self._log(f"resumed from {folder} at epoch {self.epoch}, step {self.step}")

    # ------------------------------------------------------------------ loop
    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg)

    def _epoch_batches(self, epoch: int):
        sampler = DistributedSampler(self.train_set, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=True, seed=self.cfg.train.seed, drop_last=True)
        sampler.set_epoch(epoch)
        batches = BatchSampler(sampler, self.micro_batch, drop_last=True)
        # skip the micro-batches a mid-epoch checkpoint already consumed
        skip = self.step_in_epoch * self.cfg.train.grad_accum
        indices = list(itertools.islice(batches, skip, self.steps_per_epoch * self.cfg.train.grad_accum))
        # An own generator: creating the iterator must not consume the global RNG (exact resume). Workers and
        # pinned memory follow the device (loader_settings); loading draws no random numbers, so neither
        # changes what is trained.
        return DataLoader(self.train_set, batch_sampler=indices, collate_fn=batch_collate,
                          generator=torch.Generator(),
                          **loader_settings(self.dist.device, self.cfg.data.num_workers))

    def _optimizer_step(self, micro_batches) -> dict[str, float]:
        prepared = []
        for batch in micro_batches:
            batch = to_device(batch, self.dist.device)
            with torch.no_grad():
                prepared.append(self.task.prepare_batch(batch, train=True))
        # Gradients left over by a multi-optimizer task (the discriminator's pass reaching the generator)
        # must not leak into the next step: they are not checkpointed, so resume would differ.
        self.model.zero_grad(set_to_none=True)
        loop = _StepLoop(self)
        stats = self.task.optimizer_step(loop, prepared)
        self._check_finite(loop.bad_loss)
        return stats

    def _check_finite(self, bad_loss: float | None) -> None:
        """Stop the run when a loss of this step was NaN or infinite, on any process (all of them agree).

        Nothing is saved: ``checkpoints/last`` keeps the last good state, ``summary.json`` is not written.
        """
        bad = bad_loss is not None
        if self.dist.enabled:
            flag = torch.tensor([float(bad)], device=self.dist.device)
            bad = all_reduce_sum(flag, self.dist).item() > 0
        if bad:
            value = "on another process" if bad_loss is None else f"{bad_loss}"
            self._stop_non_finite(f"the training loss became non-finite ({value}) at step {self.step + 1} (epoch "
                                  f"{self.epoch + 1}/{self.cfg.train.epochs}, step {self.step_in_epoch + 1} of "
                                  f"{self.steps_per_epoch})")

    def _stop_non_finite(self, what: str) -> None:
        o = self.cfg.optim
        kept = (f"{self.ckpt_dir / 'last'} (step {self.saved_step}) is kept" if self.saved_step is not None
                else "no checkpoint was written")
        hints = [f"a lower optim.lr (now {o.lr:g})"]
        if not o.clip_grad:
            hints.append("gradient clipping (optim.clip_grad=1.0)")
        if self.bf16:
            hints.append("fp32 (train.bf16=false)")
        hint = hints[0] if len(hints) == 1 else f"{', '.join(hints[:-1])} or {hints[-1]}"
        raise TrainingError(f"{what}; the run stopped and {kept}; try {hint}")

    def _eval_batches(self, dataset, desc: str):
        for batch in self.task.ctx.iterate(dataset, self.cfg.train.eval_batch_size, desc=desc):
            yield self.task.prepare_batch(batch, train=False)

    def evaluate(self, dataset=None, desc: str | None = None, source=None) -> dict[str, Any]:
        """The task's evaluation of the current (EMA) model on ``dataset`` (default: the evaluation split).

        ``source``: the dataset ``dataset`` was made from, as the recipe built it; the task context's
        ``eval_set`` points at it meanwhile, so that whatever a task evaluates beyond the batches (k-NN and
        linear probes) reads the same split."""
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        desc = desc or f"eval {self.epoch}/{self.cfg.train.epochs}"
        ctx = self.task.ctx
        previous = ctx.eval_set
        if source is not None:
            ctx.eval_set = source
        try:
            with self._autocast(), gathered(model):  # fsdp: no collective per batch, so shards may differ in length
                metrics = self.task.evaluate(model, self._eval_batches(self.eval_set if dataset is None else dataset,
                                                                       desc))
        finally:
            ctx.eval_set = previous
            model.train(was_training)
        return metrics

    def fit(self) -> dict[str, Any]:
        """Train to the end (or ``max_steps``); the trackers of ``train.loggers`` are closed however it ends."""
        if self.dist.is_main and self.cfg.train.loggers:
            self.out.mkdir(parents=True, exist_ok=True)
            self.loggers = open_loggers(self.cfg.train.loggers, self.cfg.train.logger_args, self.out,
                                        config=config_to_dict(self.cfg), config_yaml=config_to_yaml(self.cfg),
                                        primary=f"eval_{self.task.primary_metric}", step=self.step,
                                        history=self.history)
        status = "FAILED"
        try:
            summary = self._fit()
            status = "FINISHED"
            return summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.loggers.close(status)

    def _fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", config_to_yaml(cfg))
            # The checkpoint's history is the truth: records a crash left after the checkpoint go (on resume
            # they would be written again), and a fresh run does not append to an older run's file.
            atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
            n_params = sum(p.numel() for p in self.model.parameters())
            held = f"val {len(self.eval_set)} / test {len(self.test_set)} (read once, at the end)" \
                if self.test_set is not None else f"eval {len(self.eval_set)}"
            self._log(f"{self.model_title}: {n_params / 1e6:.2f}M parameters | train {len(self.train_set)} / {held} "
                      f"images | {self.steps_per_epoch} steps/epoch x {t.epochs} epochs | "
                      f"batch {t.batch_size} on {self.dist.world_size} process(es) | {'bf16' if self.bf16 else 'fp32'}"
                      + (" (train.bf16=auto)" if t.bf16 == "auto" else ""))
        self.model.train()
        stopped = False
        self._fit_started = time.perf_counter()
        while self.epoch < t.epochs and not stopped:
            stopped = self._run_epoch()
        if self.test_set is not None and not stopped and self.epoch >= t.epochs:  # (none with eval_split=null)
            # the one reading of the test set: the final model, after every choice was made on validation
            split = self.cfg.data.test_split or self.cfg.data.eval_split
            self.test_metrics = scalar_metrics(self.evaluate(self.test_set, desc=f"test ({split})",
                                                                source=self._source_test))
            self.loggers.log_metrics({f"test_{k}": v for k, v in self.test_metrics.items()}, self.step)
            self._log(f"test ({split}, final model): " +
                      " ".join(f"{k} {v:.4g}" for k, v in self.test_metrics.items() if k != "count"))
        summary = self.summary(stopped)
        if self.dist.is_main:
            atomic_write_json(self.out / "summary.json", summary)
            self._log(self.format_summary(summary))
        return summary

    def _run_epoch(self) -> bool:
        """One epoch (or its remainder after a resume); True when ``max_steps`` stopped the run."""
        t, epoch = self.cfg.train, self.epoch
        loader = self._epoch_batches(epoch)
        totals = self.epoch_totals
        seen, start = 0, time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not (self.dist.is_main and t.progress), dynamic_ncols=True, leave=True)
        micro = iter(loader)
        while self.step_in_epoch < self.steps_per_epoch:
            group = list(itertools.islice(micro, t.grad_accum))
            if len(group) < t.grad_accum:
                break
            stats = self._optimizer_step(group)
            self.step += 1
            self.step_in_epoch += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            totals["step_count"] = totals.get("step_count", 0.0) + 1
            seen += int(stats.get("count", 0)) * self.dist.world_size
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{stats.get('loss', math.nan) / max(1, stats.get('count', 1)):.4f}",
                            lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}", img_s=f"{seen / elapsed:.0f}")
            if t.max_steps is not None and self.step >= t.max_steps and self.step_in_epoch < self.steps_per_epoch:
                bar.close()
                self.wall_clock += time.perf_counter() - start
                self.save("last")
                self._log(f"stopped at step {self.step} (train.max_steps); resume with --resume {self.out}")
                return True
            if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                self.wall_clock += time.perf_counter() - start
                start, seen = time.perf_counter(), 0
                self.save("last")
        bar.close()
        elapsed = time.perf_counter() - start
        self.wall_clock += elapsed
        record = self._epoch_record(totals, seen, elapsed)
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_totals = {}
        evaluated = self.epoch % t.eval_every == 0 or self.epoch == t.epochs
        if evaluated:
            metrics = self.evaluate()
            scalars = scalar_metrics(metrics)
            key = self.task.primary_metric
            if key not in scalars:
                raise ConfigError(f"task {self.task.name!r} declares primary metric {key!r} but its evaluation "
                                  f"returned {sorted(scalars)}")
            record.update({f"eval_{k}": v for k, v in scalars.items()})
            self.last_eval = metrics
            eval_model = self.ema.module if self.ema is not None else self.model
            if self._improves(scalars[key]):
                self.best = {"epoch": self.epoch, **scalars}
                self.save("best", model=eval_model, with_state=False)
            with gathered(eval_model):  # fsdp: every process gathers, so rank 0 alone may run the model
                if self.dist.is_main:
                    self.task.write_artifacts(eval_model, metrics, self.out)
            shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k != "count")
            self._log(f"epoch {self.epoch}: train loss {record.get('train_loss', math.nan):.4f} | eval {shown} | "
                      f"{record['train_img_s']:.0f} img/s")
        # seconds since this process began fitting, evaluations included: time-to-accuracy curves read it
        record["fit_elapsed_s"] = time.perf_counter() - getattr(self, "_fit_started", start)
        self.history.append(record)
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.loggers.log_metrics(record, self.step)  # what metrics.jsonl gets, the trackers get
            if evaluated:  # not every epoch: 500 epochs of 1% of a dataset would spend minutes drawing
                from ..viz.plots import plot_curves

                plot_curves(self.history, self.out / "curves.png", self.task.primary_metric)
                self.loggers.log_pictures(self.out, self.step)  # curves.png and the task's pictures
        self.save("last")
        barrier(self.dist)
        return t.max_steps is not None and self.step >= t.max_steps and self.epoch < t.epochs

    def _improves(self, value: float) -> bool:
        if not self.best:
            return True
        best = self.best[self.task.primary_metric]
        return value > best if self.task.mode == "max" else value < best

    def _global_totals(self) -> dict[str, float]:
        """This epoch's statistics so far summed over processes, the per-step ones (``step_*``) per process:
        what a checkpoint stores, so that a resume with any number of processes ends the epoch with the same
        record. Every process must call it."""
        keys = sorted(self.epoch_totals)
        device = self.dist.device if self.dist.enabled else "cpu"  # nccl reduces CUDA tensors only
        values = torch.tensor([self.epoch_totals[k] for k in keys], dtype=torch.float64, device=device)
        summed = all_reduce_sum(values, self.dist).tolist()
        return {k: v / self.dist.world_size if k.startswith("step_") else v for k, v in zip(keys, summed)}

    def _epoch_record(self, totals: dict[str, float], seen: int, elapsed: float) -> dict[str, Any]:
        """Every statistic the task returned: sums divided by ``count``, ``step_*`` values averaged per step."""
        keys = sorted(totals)
        device = self.dist.device if self.dist.enabled else "cpu"  # nccl reduces CUDA tensors only
        values = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
        reduced = dict(zip(keys, all_reduce_sum(values, self.dist).tolist()))
        count, steps = reduced.pop("count", 0.0), reduced.pop("step_count", 0.0)
        record: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step}
        for k, v in reduced.items():
            if k.startswith("step_"):
                record[f"train_{k[5:]}"] = v / max(1.0, steps)  # both summed over processes
            else:
                record[f"train_{k}"] = v / max(1.0, count)
        record.update(lr=self.optimizer.param_groups[-1]["lr"], train_img_s=seen / max(elapsed, 1e-9),
                      epoch_time_s=elapsed)
        return record

    # ------------------------------------------------------------------ report
    def summary(self, stopped: bool = False) -> dict[str, Any]:
        evals = [h for h in self.history if any(k.startswith("eval_") for k in h)]
        speeds = [h["train_img_s"] for h in self.history]
        final = ({k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")} | {"epoch": evals[-1]["epoch"]}
                 if evals else {})
        summary = {
            "model": self.model_title, "task": self.task.name,
            "primary_metric": self.task.primary_metric, "mode": self.task.mode,
            "finished": not stopped and self.epoch >= self.cfg.train.epochs,
            "epochs_done": self.epoch, "steps": self.step,
            "best": dict(self.best), "final": final,
            "eval_split": "val" if self.cfg.data.val_fraction > 0 else self.cfg.data.eval_split,
            **({"test": dict(self.test_metrics)} if self.test_metrics is not None else {}),
            "train_wall_clock_s": self.wall_clock,
            "train_img_s": float(np.median(speeds)) if speeds else None,
            "params": sum(p.numel() for p in self.model.parameters()),
            "best_checkpoint": str(self.ckpt_dir / "best") if (self.ckpt_dir / "best").is_dir() else None,
            "last_checkpoint": str(self.ckpt_dir / "last"),
            "output_dir": str(self.out),
        }
        if self.last_eval is not None:
            summary.update(self.task.summary_fields(self.last_eval))
        return summary

    @staticmethod
    def format_summary(s: dict[str, Any]) -> str:
        key = s["primary_metric"]

        def show(d: dict[str, Any]) -> str:
            v = d.get(key)
            return "n/a" if v is None else f"{v:.4f}" + (f" (epoch {d['epoch']})" if "epoch" in d else "")

        others = ", ".join(f"{k} {v:.4g}" for k, v in s["final"].items() if k not in (key, "epoch", "count"))
        lines = [
            "=" * 64,
            f"{'finished' if s['finished'] else 'stopped'}: {s['model']} ({s['params'] / 1e6:.2f}M params), "
            f"task {s['task']}, {s['epochs_done']} epochs / {s['steps']} steps",
            f"best eval {key} {show(s['best'])} ({'higher' if s['mode'] == 'max' else 'lower'} is better), "
            f"final {show(s['final'])}",
            *([f"final eval: {others}"] if others else []),
            *([f"test set, read once by the final model: {key} {show(s['test'])} (choices above were made on "
               "the validation split)"] if "test" in s else []),
            f"training wall-clock {s['train_wall_clock_s']:.1f} s, " + (
                "train images/s n/a (no full epoch)" if s["train_img_s"] is None
                else f"{s['train_img_s']:.0f} train images/s (median epoch)"),
            f"best checkpoint: {s['best_checkpoint']}" if s["best_checkpoint"] else
            f"no evaluation yet, so no best checkpoint; last checkpoint: {s['last_checkpoint']}",
            f"metrics.jsonl, curves.png and the task's pictures: {s['output_dir']}",
            "=" * 64,
        ]
        return "\n".join(lines)


RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints")  # what makes a folder hold a run
IF_EXISTS = ("refuse", "resume", "overwrite")


def holds_run(folder: str | Path) -> bool:
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def train(recipe: str | Path | None = None, overrides: list[str] | None = None, resume: str | Path | None = None,
          base: dict[str, Any] | None = None, if_exists: str = "refuse") -> dict[str, Any]:
    """Train from a YAML recipe plus dotted overrides; returns the run summary (also ``summary.json``).

    With ``resume`` (a run folder or checkpoint folder) the run continues where it stopped, in that run folder
    (wherever it is now, unless ``output_dir`` is overridden). The saved ``config.yaml`` of that run is the
    base, so only new overrides need to be given. A fresh run never lands silently on another one: an output
    folder that holds a run is refused (``if_exists="refuse"``), continued from its last checkpoint
    (``"resume"``; a folder without one starts afresh) or replaced (``"overwrite"``: its checkpoints and metrics
    are removed first).
    """
    if if_exists not in IF_EXISTS:
        raise ConfigError(f"if_exists must be one of {IF_EXISTS}, got {if_exists!r}")
    root = run_folder(resume) if resume is not None else None
    if resume is not None and recipe is None:
        saved = root / "config.yaml" if root is not None else None
        if saved is None or not saved.is_file():  # the checkpoint's own copy of the run's config
            with suppress(CheckpointError):
                saved = resolve(checkpoint_target(resume)) / "train_config.yaml"
        if saved is not None and saved.is_file():
            recipe = saved
            # max_steps stopped the earlier session; it is not part of what the run trains
            overrides = ["train.max_steps=null", *(overrides or [])]
    cfg = load_config(recipe, overrides, base)
    if resume is None and recipe is not None and cfg.train.logger_args.mlflow.experiment is None \
            and "mlflow" in cfg.train.loggers:
        cfg.train.logger_args.mlflow.experiment = Path(recipe).stem  # the recipe names the MLflow experiment
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        from ..utils import path_kind

        raise ConfigError(f"{cfg.output_dir}: output_dir must be a folder (for the run's checkpoints and metrics), "
                          f"and this is {path_kind(cfg.output_dir)}")
    overwrite = False
    if resume is None and holds_run(cfg.output_dir):
        out = cfg.output_dir
        if if_exists == "refuse":
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            elastic = (f" (this is torchrun's restart {restart}: launch with --if-exists resume so that a "
                       "restarted job continues its run)") if restart not in ("", "0") else ""
            raise ConfigError(f"{out} already holds a run; continue it with `vitkit train --resume {out}`, choose "
                              f"another --output-dir, or pass --if-exists resume|overwrite{elastic}")
        # resolve, not is_dir: a kill between the renames of a checkpoint swap leaves no folder named last, but
        # a complete copy beside it (an elastic restart kills the survivors at any point)
        if if_exists == "resume" and _has_checkpoint(Path(out) / "checkpoints" / "last"):
            return train(recipe, overrides, resume=out, base=base)
        overwrite = True  # asked for, or a run that stopped before its first checkpoint: nothing to continue
    saved_dir = cfg.output_dir
    # The run continues in the folder it is resumed from, even when that folder was moved or renamed since,
    # unless output_dir is given explicitly (to continue a copy of the run elsewhere).
    into_root = root is not None and not any(o.partition("=")[0].strip() == "output_dir" for o in overrides or [])
    if into_root:
        cfg.output_dir = str(root)
    dist = init_distributed(cfg.train.device)
    if overwrite:
        if dist.is_main:
            shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json"):
                (Path(cfg.output_dir) / name).unlink(missing_ok=True)
        barrier(dist)
    if into_root and dist.is_main and Path(saved_dir).resolve() != root.resolve():
        tqdm.write(f"writing to {root}, the run folder resumed from (the saved config says output_dir={saved_dir})")
    try:
        trainer = Trainer(cfg, resume=resume, dist=dist)
        return trainer.fit()
    finally:
        cleanup(dist)


def _has_checkpoint(folder: Path) -> bool:
    try:
        resolve(folder)
    except CheckpointError:
        return False
    return True


def checkpoint_target(resume: str | Path) -> Path:
    """The checkpoint folder a ``--resume`` target names: ``RUN/checkpoints/last`` for a run folder."""
    path = Path(resume)
    return path / "checkpoints" / "last" if (path / "checkpoints").is_dir() else path


def run_folder(resume: str | Path) -> Path | None:
    """The run folder of a ``--resume`` target: a run folder itself, or ``RUN`` for ``RUN/checkpoints/<name>``
    (and for the ``.<name>.old`` / ``.<name>.tmp-*`` copies a crash may leave there); None for a checkpoint
    folder that is not inside a run folder."""
    path = Path(resume)
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        return path
    if path.parent.name == "checkpoints":
        return path.parent.parent
    if (path / "model.safetensors").is_file():
        return None
    return path

