"""The training loop: data -> loss(sde, network) -> AdamW -> EMA -> checkpoint (DESIGN section 10).

One `Trainer` serves a single process and PyTorch DDP (launched by torchrun; gloo on CPU, nccl on
GPU). Randomness is reproducible and resumable: one CPU generator draws every step's global
batch indices, times and noise (each process then takes its slice, so any number of processes
computes the same global batch); extra randomness inside a loss (sliced projections, Langevin
paths) comes from a generator seeded by (seed, step, rank). With the generator, optimiser and
EMA states in the checkpoint, a run killed at any step and resumed reaches, on CPU, bit-identical
weights to an uninterrupted run.

With `accumulate` = k the drawn global batch holds k x batch_size samples, and the step averages the
gradients of its k consecutive slices (micro-batches; under DDP without an all-reduce on the first
k - 1), so it equals one step on the whole batch up to float rounding. `precision` and `compile` apply
to the networks only (`running.precision`); a GradScaler scales fp16 losses, and an fp16 step whose
gradient overflowed is skipped (the scale halves) instead of stopping the run.

The run folder records the data the run was trained on (`data.data_record` in data.yaml); resuming on other
data is refused. SIGINT or SIGTERM during `run()` lets the current step finish, saves a checkpoint of it
and raises `TrainingInterrupted` (under DDP every process stops after the same step); running the same
command resumes from there, as exactly as from any checkpoint.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..core.errors import InvalidValueError, ScoresdeError
from ..core.sde import LinearSDE
from ..learning.losses import LOSSES, sample_time
from ..learning.networks import EMA, edm_decay, power_decay
from .build import (
    build_model,
    build_sde,
    check_config,
    draw_samples,
    lookup,
    resolve_device,
)
from .checkpoint import (
    CHECKPOINT,
    has_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
)
from .config import Config, config_from_dict, read_yaml, save_config
from .data import (
    Dataset,
    check_dataset,
    data_mismatch,
    data_record,
    load_config_data,
    read_data_record,
    save_data_record,
    take_batch,
)
from .files import append_line, atomic_write
from .precision import compile_blocker, native_precision, resolve_precision, training_view

__all__ = ["NonFiniteLoss", "Trainer", "TrainingInterrupted", "ema_decay", "learning_rate"]

# config keys that may change when a run is resumed; only `steps` affects the weights (it extends the run,
# and with lr_schedule=cosine it also reshapes the remaining learning rates), `device` and `compile` only
# up to float rounding; `out` names where the run folder is found, so a moved folder (or the same one given by
# another path) resumes
RESUMABLE_CHANGES = {"steps", "progress", "log_every", "eval_every", "checkpoint_every", "n_eval", "nfe",
                     "sampler", "threads", "device", "data_workers", "data_memory_mb", "compile", "out"}
# the signals that stop `Trainer.run` after a saved step, in the order their names are preferred under DDP
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up over cfg.warmup steps, then constant or cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
    return cfg.lr


def ema_decay(cfg: Config) -> float | Callable[[int], float]:
    """The EMA decay of cfg.ema_schedule: constant ema_decay, or the schedule n -> beta_n (`networks.EMA`)."""
    if cfg.ema_schedule == "power":
        return partial(power_decay, gamma=cfg.ema_gamma, power=cfg.ema_power)
    if cfg.ema_schedule == "edm":
        return partial(edm_decay, halflife=cfg.ema_halflife, rampup=cfg.ema_rampup)
    return cfg.ema_decay


def _micro(v: Tensor | None, k: int) -> list[Tensor | None]:
    """k equal consecutive slices of a batch tensor (None: k times None)."""
    return [None] * k if v is None else list(v.chunk(k))


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short by a kill or a full disk (dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class NonFiniteLoss(ScoresdeError, RuntimeError):
    """The loss or gradient became NaN/inf; the run stopped before touching the weights. (In fp16 an overflowed
    gradient is the GradScaler's signal: that step is skipped, the run goes on.)"""


class TrainingInterrupted(ScoresdeError):
    """SIGINT or SIGTERM stopped `Trainer.run` after a step whose checkpoint was then saved; `signum` is the signal,
    `step` the step saved."""

    def __init__(self, signum: int, step: int, checkpoint: os.PathLike):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}; "
                         f"run the same command to resume")


class Trainer:
    """Builds data, SDE, model, AdamW and EMA from a Config; `run()` trains, checkpoints and evaluates.

    The run's `models.Family` record (`build.check_config`) must accept cfg.loss and cfg.sampler; a family
    with its own training loop is trained by the class `running.trainers.trainer_for` names.

    With resume=True (default) a run directory that holds a checkpoint is continued from it.
    Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel.
    """

    def __init__(self, cfg: Config, data: Dataset | None = None, resume: bool = True):
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
        if cfg.batch_size % self.world:
            raise InvalidValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {self.world}")
        if cfg.compile and (reason := compile_blocker(self.device)):
            raise InvalidValueError(f"config compile: torch.compile cannot compile on this platform ({reason}); "
                             f"set compile: false")
        self.data = check_dataset(data) if data is not None else load_config_data(cfg)
        self.data_record = data_record(self.data, "config" if data is None else "api")
        self.family = check_config(cfg)
        self.sde = build_sde(cfg)
        self.loss_fn, self.loss_args, self.time_args = self._loss_setup()
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.sde, self.data.sample_shape).to(self.device)
        self.ema = EMA(self.model, ema_decay(cfg))
        if cfg.warmup > cfg.steps and self.rank == 0:
            warnings.warn(f"config warmup ({cfg.warmup}) is longer than steps ({cfg.steps}): the learning rate only "
                          f"reaches {learning_rate(cfg, cfg.steps - 1):.3g} of lr = {cfg.lr:g}; set warmup=0..{cfg.steps}",
                          stacklevel=2)
        init_share = cfg.ema_decay ** cfg.steps if cfg.ema_schedule == "constant" else 0.0
        if init_share > 0.05 and self.rank == 0:
            warnings.warn(f"ema_decay {cfg.ema_decay} averages over ~{1 / (1 - cfg.ema_decay):.0f} steps: after "
                          f"steps = {cfg.steps} the EMA weights used for sampling still hold {init_share:.0%} of the "
                          f"random initialisation; train longer or lower ema_decay", stacklevel=2)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.precision = resolve_precision(cfg.precision, self.device)  # "auto" resolved on this device
        if not native_precision(self.device, self.precision) and self.rank == 0:
            cpu = f" ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 / AMX)" if self.device.type == "cpu" else ""
            warnings.warn(f"config precision {self.precision}: this {self.device.type}{cpu} does not compute in it "
                          f"natively, so autocast is emulated and several times slower than fp32; set precision: auto "
                          f"or fp32", stacklevel=2)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        B, lo, hi = cfg.batch_size, self.rank * cfg.batch_size // self.world, (self.rank + 1) * cfg.batch_size // self.world
        # this process's positions in the drawn batch, micro-batch after micro-batch (all of it for one process)
        self.part = slice(None) if self.world == 1 else \
            (torch.arange(cfg.accumulate)[:, None] * B + torch.arange(lo, hi)).flatten()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.extra = torch.Generator(self.device)  # reseeded every step (`_batch`)
        self.train_x = self.data.train.to(self.device)
        self.n_classes = int(cfg.net_args.get("n_classes", 0))
        if self.n_classes and self.data.train_labels is None:
            raise InvalidValueError(f"net_args.n_classes = {self.n_classes} needs labelled data; {self.data.name!r} has no labels")
        self.train_y = self.data.train_labels.to(self.device) if self.n_classes else None
        self.step = 0
        self.run_dir = cfg.run_dir
        self.ckpt_path = self.run_dir / CHECKPOINT
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.last_checkpoint: int | None = None
        self._signal: int | None = None  # the first SIGINT / SIGTERM received during `run`
        self.stop_signal: int | None = None  # the signal that stops training after this step (agreed under DDP)
        if resume and has_checkpoint(self.ckpt_path):
            self._resume()
        elif self.rank == 0:  # a fresh start: an old checkpoint or log would mix with the new run
            remove_checkpoints(self.ckpt_path)
            self.metrics_path.unlink(missing_ok=True)
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            save_data_record(self.data_record, self.run_dir)
            n = sum(p.numel() for p in self.model.parameters())
            print(f"run {self.run_dir}: {n:,} parameters, precision {self.precision}, batch {cfg.batch_size} x "
                  f"accumulate {cfg.accumulate}{', compiled' if cfg.compile else ''}, EMA {cfg.ema_schedule}", flush=True)
            if self.step:
                print(f"resuming from step {self.step} ({self.ckpt_path})", flush=True)
        self.net = training_view(self.model, self.device, self.precision, cfg.compile)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)

    def _loss_setup(self) -> tuple[Callable[..., Tensor], dict[str, Any], dict[str, Any]]:
        cfg = self.cfg
        fn = lookup(LOSSES, cfg.loss)
        own = {"t", "noise", "generator", "score_fn", "sde", "x0", "true_score"}
        valid = [p for p in inspect.signature(fn).parameters if p not in own]
        unknown = sorted(set(cfg.loss_args) - set(valid))
        if unknown:
            raise InvalidValueError(f"unknown loss_args for {cfg.loss!r}: {', '.join(unknown)}; valid: {', '.join(valid)}")
        args = dict(cfg.loss_args)
        time_args = {"weighting": args.get("weighting", "sigma2"), "importance": args.pop("importance", False)}
        if "true_score" in inspect.signature(fn).parameters:
            if self.data.mixture is None:
                raise InvalidValueError(f"loss {cfg.loss!r} needs the exact score: use an analytic data set "
                                 "(ring, grid, mixture<d>) or another loss")
            args["true_score"] = self.data.mixture.score_fn(self.sde)
        return fn, args, time_args

    def _resume(self) -> None:
        saved_path = self.run_dir / "config.yaml"
        if saved_path.exists():
            saved = read_yaml(saved_path)
            # keys added since the run was saved take their defaults, resolved as then (ema_decay: constant)
            saved = config_from_dict({k: v for k, v in saved.items() if k in Config.__dataclass_fields__}).to_dict()
            changed = sorted(k for k, v in self.cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved[k] != v)
            if changed:
                raise InvalidValueError(f"{self.run_dir} holds a run with a different config ({', '.join(changed)} differ); "
                                 f"choose another name=... or remove that folder")
        saved_data = read_data_record(self.run_dir)
        if saved_data is not None and saved_data["sha256"] != self.data_record["sha256"]:
            raise InvalidValueError(f"{data_mismatch(self.data, saved_data, f'the run in {self.run_dir}')}; resume it on "
                                    f"the data it was trained on, or choose another name=... (or restart)")
        self.step, _ = load_checkpoint(self.ckpt_path, model=self.model, ema=self.ema, optimizer=self.opt,
                                       generators={"train": self.gen}, scaler=self.scaler, net=self.cfg.net,
                                       net_args=self.cfg.net_args)
        self.last_checkpoint = self.step
        if self.rank == 0 and self.metrics_path.exists():  # drop records written after the checkpoint
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if _record_step(ln) <= self.step]
            atomic_write(self.metrics_path, "".join(ln + "\n" for ln in lines).encode())

    # one optimisation step -------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None, torch.Generator]:
        """This process's slice of the global batch: x0, labels (class-conditional nets, else None), t, noise,
        importance factors (None when times are uniform), extra generator."""
        B, n = self.cfg.batch_size * self.cfg.accumulate, self.train_x.shape[0]
        idx = torch.randint(n, (B,), generator=self.gen)
        t, r = sample_time(self.sde, B, generator=self.gen, dtype=self.train_x.dtype, **self.time_args)
        noise = torch.randn((B,) + self.data.sample_shape, generator=self.gen) \
            if isinstance(self.sde, LinearSDE) else None
        part = self.part
        extra = self.extra.manual_seed((self.cfg.seed * 1_000_003 + step) * 1024 + self.rank)
        dev = self.device
        y = None if self.train_y is None else self.train_y[idx[part].to(dev)]
        x0 = take_batch(self.train_x, idx, part, self.gen, self.cfg.hflip)
        return (x0, y, t[part].to(dev), None if noise is None else noise[part].to(dev),
                r[part].to(dev) if self.time_args["importance"] else None, extra)

    def _labelled(self, y: Tensor | None, generator: torch.Generator) -> Callable:
        """The network with labels bound, each replaced by the null label with probability label_dropout
        (classifier-free guidance training, Ho & Salimans 2207.12598)."""
        if y is None:
            return self.net
        drop = torch.rand(y.shape, generator=generator, device=y.device) < self.cfg.label_dropout
        return partial(self.net, y=torch.where(drop, torch.full_like(y, self.n_classes), y))

    def _train_step(self) -> tuple[float, float]:
        cfg, k = self.cfg, self.cfg.accumulate
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(cfg, self.step)
        x0, y, t, noise, r, extra = self._batch(self.step)
        self.opt.zero_grad(set_to_none=True)
        value = 0.0
        for j, (x0_j, y_j, t_j, noise_j, r_j) in enumerate(zip(*(_micro(v, k) for v in (x0, y, t, noise, r)))):
            with self.net.no_sync() if self.world > 1 and j < k - 1 else nullcontext():
                loss = self.loss_fn(self._labelled(y_j, extra), self.sde, x0_j, t=t_j, noise=noise_j, generator=extra,
                                    **self.loss_args)
                loss = (loss if r_j is None else loss * r_j).mean()
                self.scaler.scale(loss / k if k > 1 else loss).backward()
            value = value + loss.detach()
        value = value / k if k > 1 else value
        seen = value.new_zeros(0)
        if self.world > 1:  # one all-reduce sums the loss and, per stop signal, the processes that received it
            seen = torch.tensor([self._signal == s for s in STOP_SIGNALS], dtype=value.dtype, device=value.device)
            reduced = torch.cat((value.reshape(1), seen))
            dist.all_reduce(reduced)
            value, seen = reduced[0] / self.world, reduced[1:]
        self.scaler.unscale_(self.opt)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.params
                                                                          if p.grad is not None])))
        # the step's one host sync
        loss_f, norm_f, *counts = torch.cat((value.float().reshape(1), norm.float().reshape(1), seen.float())).tolist()
        self.stop_signal = self._signal if self.world == 1 else \
            next((sig for sig, c in zip(STOP_SIGNALS, counts) if c > 0), None)
        if not math.isfinite(loss_f):
            raise NonFiniteLoss(f"loss is {loss_f} at step {self.step} (precision {self.precision}); training "
                                f"stopped. {self._last_good()}")
        if not math.isfinite(norm_f) and not self.scaler.is_enabled():
            raise NonFiniteLoss(f"gradient norm is {norm_f} at step {self.step} (precision {self.precision}); "
                                f"training stopped. {self._last_good()}")
        if 0 < cfg.grad_clip < norm_f:
            nn.utils.clip_grads_with_norm_(self.params, cfg.grad_clip, norm)
        self.scaler.step(self.opt)  # fp16: skipped when a gradient overflowed, the scale then halves
        self.scaler.update()
        self.ema.update()
        self.step += 1
        return loss_f, norm_f

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint {self.ckpt_path} (step {self.last_checkpoint}) is intact."

    # the loop --------------------------------------------------------------------------------
    def save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.ckpt_path, model=self.model, ema=self.ema, optimizer=self.opt, step=self.step,
                            generators={"train": self.gen}, scaler=self.scaler,
                            extra={"data": self.data.name, "world_size": self.world, "net": self.cfg.net,
                                   "net_args": self.cfg.net_args})
        self.last_checkpoint = self.step

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            append_line(self.metrics_path, json.dumps(record))

    @contextmanager
    def _catch_signals(self) -> Iterator[None]:
        """While training, SIGINT and SIGTERM only note the first signal (later ones, e.g. during the save it
        causes, are ignored); the previous handlers come back afterwards, and a signal noted too late to stop
        training (after the last step's check) is then delivered to them. Handlers can only be installed in
        the main thread: elsewhere the signals keep theirs."""
        self._signal = self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, frame: Any) -> None:
            if self._signal is None:
                self._signal = signum

        previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
        try:
            yield
        finally:  # None: a handler not installed from Python, whose default is the best stand-in
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if self._signal is not None and self.stop_signal is None:
            signal.raise_signal(self._signal)

    def run(self, until: int | None = None) -> Trainer:
        """Train up to step `until` (default cfg.steps). Checkpoints every checkpoint_every steps and at
        cfg.steps; stopping earlier (until < steps) leaves the state as a killed run would. SIGINT or SIGTERM
        stops after the current step, whose checkpoint is saved: `TrainingInterrupted` (module docstring)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not cfg.progress or self.rank != 0)
        losses, tic, start = [], time.perf_counter(), self.step
        self.net.train()
        with self._catch_signals():
            try:
                while self.step < until:
                    loss, norm = self._train_step()
                    losses.append(loss)
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        rate = (self.step - start) / (time.perf_counter() - tic)
                        self._log({"step": self.step, "loss": sum(losses) / len(losses), "grad_norm": norm,
                                   "lr": self.opt.param_groups[0]["lr"], "steps_per_s": rate})
                        bar.set_postfix(loss=f"{sum(losses) / len(losses):.4g}")
                        losses = []
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save()
                    if self.rank == 0 and cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                        self._log({"step": self.step, **self.evaluate()})
                    if self.stop_signal is not None:
                        if self.last_checkpoint != self.step:
                            self.save()
                        if self.world > 1:  # no process exits (and gets the others stopped) before the save
                            dist.barrier()
                        raise TrainingInterrupted(self.stop_signal, self.step, self.ckpt_path)
            finally:
                bar.close()
        return self

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n samples (on the CPU) from the EMA model with the configured sampler and nfe."""
        return draw_samples(self.sde, self.ema.copy(), (n,) + self.data.sample_shape, self.cfg.sampler, self.cfg.nfe,
                            generator=generator, family=self.family, device=self.device)[0].cpu()

    def evaluate(self) -> dict[str, float]:
        """Held-out loss of the EMA model and W2 of its samples to held-out data; saves a snapshot PNG.
        Uses its own generators, so the training randomness is untouched."""
        from ..evaluation.metrics import w2_report
        from .plots import plot_samples

        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed + 1)
        test = self.data.test[:cfg.n_eval].to(self.device)
        model = self.ema.copy()
        t, r = sample_time(self.sde, test.shape[0], generator=g, dtype=test.dtype, **self.time_args)
        noise = torch.randn(test.shape, generator=g).to(self.device) if isinstance(self.sde, LinearSDE) else None
        g_dev = torch.Generator(self.device).manual_seed(cfg.seed + 2)  # randomness inside the loss
        eval_loss = (self.loss_fn(model, self.sde, test, t=t.to(self.device), noise=noise, generator=g_dev,
                                  **self.loss_args) * r.to(self.device)).mean().item()
        x = self.sample(test.shape[0], generator=g)
        plot_samples(x, self.data.test[:cfg.n_eval], self.run_dir / "snapshots" / f"step_{self.step:07d}.png",
                     title=f"step {self.step}")
        return {"eval_loss": eval_loss, **w2_report(x, self.data, generator=g)}
