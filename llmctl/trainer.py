"""The one training loop, shared by pretraining and SFT.

The trainer knows nothing about where its config, data or model came from. It gets a
model, a `TrainConfig` section, a batch source with `next_batch()` and state, and an
`evaluate()` function; it reports through callbacks as plain dicts. SFT differs only in
its batches (ignored targets) and starting weights.

One optimizer step = `accumulation` micro-batches per rank. Its loss is the sum of every
target token's loss over all micro-batches and ranks divided by the step's target-token
count, so the gradient is that of one batch of `batch_size` sequences however the step is
split (micro-batch size, number of processes), also when targets are ignored (SFT). The loss
is read back to the host only at log steps, and stop requests and the time budget are agreed
between ranks in the background, so the device never waits on the Python loop.

Stopping safely, for every stage alike:
- Resume: `state_dict()` holds everything the loop depends on (weights, optimizer, step and
  thus the LR position, tokens seen, the batch source's position, every RNG, the evaluation
  history); `load_state_dict()` then `fit()` continues bit-identically on CPU in fp32. An
  evaluation that was due at the resumed step but had not finished is run first.
- Saves: every save_every steps, before every evaluation (an eval that runs out of memory
  must not cost the steps since the last save), on a stop signal, and at the end.
- NaN/Inf guard without a sync per step: each step folds "is the loss and gradient norm
  finite" into a device-side scalar holding the first bad step (a few tiny kernels, no host
  read). The host reads it where it syncs anyway — at log steps — and before every save and
  evaluation, so a bad state is never written over a good checkpoint; the error names the
  first bad step. With fp16 the gradient scaler already skips steps with inf gradients, so
  only the loss is watched there.
- Signals: inside `fit()` SIGINT/SIGTERM ask for a stop (`runtime.StopSignals`); the step in
  flight completes, a checkpoint of that step is saved and `TrainingInterrupted` (exit code
  130 / 143) is raised. An evaluation is abandoned at once (it changes no state). Callbacks
  hear of the request the moment it arrives (`on_stop_requested`, from a watcher thread), not
  when the step in flight ends. Distributed, every rank stops at the same step, one step after
  the request is seen.
- Display: `on_step` follows every optimizer step with what the wall clock alone tells (step,
  fraction done, ETA from `steptime.StepClock`); no host sync, so it costs the device nothing.
- Random streams: each rank draws its own dropout masks (rank 0 the stream one process would
  draw); checkpoints hold every rank's RNG state, so a distributed run resumes exactly too.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llmctl.config import TrainConfig, parse_duration
from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.errors import ConfigError, LlmctlError
from llmctl.data.batches import BatchSource, RankShard
from llmctl.optim import build_optimizers, lr_at
from llmctl.runtime import (DistInfo, RankAgreement, StopRequested, StopSignals, all_ranks_sum, autocast,
                            gather_to_all, rng_state, set_rng_state, signal_name, split_rng_stream)
from llmctl.steptime import StepClock


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception, or one it was raised from (a compiler wraps what it hits), is a
    device or host allocation failure."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(seen, RuntimeError) and "can't allocate memory" in str(seen):  # the CPU allocator
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class TrainingStopped(LlmctlError):
    """Training ended before max_steps. `step` is the last completed optimizer step.

    The trainer knows the step; the stage that runs it knows the checkpoint and the command
    line, and words the one-line message (`llmctl.stage.stop_message`)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(TrainingStopped):
    """SIGINT or SIGTERM: a checkpoint of the current step was saved; exit code 128 + signal."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal_name(signum)} at step {step}", step)
        self.signum = signum
        self.exit_code = 128 + signum


class NonFiniteLoss(TrainingStopped):
    """The loss or gradient norm became NaN/Inf; nothing was saved after the last good step."""

    exit_code = 1

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"the loss became non-finite at step {step}", step)
        self.loss, self.grad_norm = loss, grad_norm


class Callback:
    """Hooks the trainer calls; records are plain dicts.

    `on_step` runs after every optimizer step (after `on_log` where the step logs), on the hot
    path: keep it cheap (its record holds step, max_steps, progress, eta_seconds,
    elapsed_seconds and, with a time budget, train_seconds and max_time_seconds).
    `on_stop_requested` runs on a watcher thread the moment SIGINT/SIGTERM arrives, while the
    main thread may be mid-step."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_step(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...
    def on_log(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...
    def on_eval_start(self, trainer: "Trainer") -> None: ...
    def on_eval(self, trainer: "Trainer", record: dict[str, Any]) -> None: ...
    def on_save(self, trainer: "Trainer", final: bool) -> None: ...
    def on_stop_requested(self, trainer: "Trainer", signum: int) -> None: ...
    def on_fit_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None: ...


def _hooks(callbacks: Sequence[Any], name: str) -> list[Callable[..., None]]:
    """The callbacks' `name` methods, skipping the base class's no-ops (the per-step loop then
    calls only real work) and callbacks written without that hook."""
    base = getattr(Callback, name)
    return [getattr(cb, name) for cb in callbacks if getattr(type(cb), name, base) is not base]


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, *, batches: BatchSource,
                 evaluate: Callable[[], dict[str, float]] | None, device: torch.device,
                 dtype: torch.dtype, seq_len: int, log_every: int = 10, compile: bool = False,
                 callbacks: Sequence[Callback] = (), dist: DistInfo | None = None):
        self.model = model  # the raw module: its state_dict is what checkpoints hold
        self.cfg = cfg
        self.dist = dist or DistInfo()
        world = self.dist.world_size
        if cfg.batch_size % (cfg.micro_batch_size * world):
            raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by micro_batch_size "
                              f"({cfg.micro_batch_size}) x {world} processes, so that every step sees the "
                              f"same global batch whatever the number of processes")
        self.batches = RankShard(batches, self.dist.rank, world) if self.dist.enabled else batches
        self.evaluate_fn = evaluate
        self.device = device
        self.dtype = dtype
        self.seq_len = seq_len
        self.log_every = log_every
        self.callbacks = list(callbacks)
        self.accumulation = cfg.batch_size // (cfg.micro_batch_size * world)  # micro-steps per rank
        self._ddp: torch.nn.Module | None = None
        if self.dist.enabled and self.dist.strategy == "fsdp":
            # FSDP2: each block's parameters become shards (DTensors) gathered just in time;
            # this must happen before the optimizer sees the parameters.
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # Buffers are not re-broadcast each step: every rank builds the same ones (the RoPE
            # tables), and none changes in training.
            with warnings.catch_warnings():  # newer torch renames the option; the old one still means this
                warnings.simplefilter("ignore", FutureWarning)
                self._ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    broadcast_buffers=False)
        self.optimizers = build_optimizers(model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.step = 0  # optimizer steps completed
        self.tokens_seen = 0
        # Time budget: seconds of fit() so far, over every resume (rank 0's clock, shared by all
        # ranks so that they agree on the LR and on the step that ends the run).
        self.max_time = parse_duration(cfg.max_time)
        self.train_seconds = 0.0
        self.out_of_time = False
        self.history: list[dict[str, Any]] = []  # eval records, for resume and summaries
        self.forward_model: torch.nn.Module = self._ddp or model
        self._compile_pending = compile
        self._gathered_state: dict[str, Any] | None = None  # FSDP: full state gathered for a save
        # NaN guard, on the device: first non-finite step (0 = none) and its (loss, grad norm).
        self._bad_step = torch.zeros((), dtype=torch.long, device=device)
        self._bad_values = torch.zeros(2, device=device)
        self._checked_good = 0  # steps up to here are known finite
        self._saved_step = -1  # the step of the newest checkpoint written by this fit
        self.save_reason = "schedule"  # why the save in progress happens (see save())
        self.stop: StopSignals | None = None
        self.in_flight: int | None = None  # the step being computed now, for a stop notice
        self.evaluating = False
        # Distributed: stop requests and rank 0's clock are agreed without a per-step host sync.
        self._agreement = RankAgreement() if self.dist.enabled else None
        self._stop_agreed = False
        # Each rank draws its own dropout masks; checkpoints keep every rank's RNG state.
        split_rng_stream(self.dist.rank)
        self._rank_rng: list[Any] | None = None  # gathered at each save

    # ------------------------------------------------------------------ one step

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accumulation` micro-batches; returns device tensors
        (mean loss per target token of the whole step, gradient norm before clipping)
        without synchronising."""
        lr = lr_at(self.step, self.cfg, self.progress())
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        micro_batches = [self._to_device(*self.batches.next_batch()) for _ in range(self.accumulation)]
        # The step's loss is the sum of its token losses over every micro-batch and rank divided
        # by the step's target-token count, so the gradient does not depend on how the step is
        # split. With ignored targets (SFT's prompts and padding) micro-batches hold different
        # counts; dividing each micro-batch's mean by `accumulation` would weigh a token of a short
        # reply more than one of a long reply. DDP and FSDP average gradients over ranks, hence
        # the world size in the scale. The count stays on the device: no host sync.
        targets = sum((y != IGNORE_INDEX).sum() for _, y in micro_batches)
        targets = all_ranks_sum(targets, self.dist).clamp(min=1)
        scale = self.dist.world_size / targets.float()
        loss_sum = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(micro_batches):
            with self._gradient_sync(micro == self.accumulation - 1), autocast(self.device, self.dtype):
                loss = self._forward_backward(x, y, scale)
            loss_sum += loss
        if self.scaler:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor; every rank holds the same total
            grad_norm = grad_norm.full_tensor()
        for optimizer in self.optimizers:
            if self.scaler:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        self.step += 1
        self.tokens_seen += self.cfg.batch_size * self.seq_len
        return loss_sum, grad_norm

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":  # page-locked host memory lets the copy run asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Backward of this micro-batch's share of the step loss; returns that share, detached.

        The first call of a compiled run compiles: forward and backward both, since the
        backward graph is compiled when it first runs. A compiler failure in either falls back
        to eager for the rest of the run, re-running this micro-batch from the same RNG state
        (its gradients are cleared first). Running out of memory is not a compiler failure: it
        propagates with its own message."""
        if not self._compile_pending:
            return self._scaled_backward(self.forward_model, x, y, scale)
        self._compile_pending = False
        rng = rng_state()
        try:
            compiled = torch.compile(self._ddp or self.model)
            loss = self._scaled_backward(compiled, x, y, scale)
            self.forward_model = compiled
            return loss
        except Exception as e:  # compilers fail in many ways; eager always works
            if is_out_of_memory(e):
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {_first_line(e)[:120]}); "
                          f"training continues in eager mode", stacklevel=2)
        self.model.zero_grad(set_to_none=True)
        set_rng_state(rng)
        self.forward_model = self._ddp or self.model
        return self._scaled_backward(self.forward_model, x, y, scale)

    def _scaled_backward(self, forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
        loss = forward(x, y, reduction="sum") * scale
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss.detach()

    @property
    def compiles_first_step(self) -> bool:
        """The next step compiles the model first (torch.compile is lazy)."""
        return self._compile_pending

    def progress(self) -> float | None:
        """Fraction of a time-budgeted run done (time or steps, whichever is further); None
        without max_time, so the LR schedule stays a pure function of the step."""
        if not self.max_time:
            return None
        return min(1.0, max(self.train_seconds / self.max_time, self.step / self.cfg.max_steps))

    def _tick(self, clock_start: float, wait: bool = False) -> None:
        """Update the time spent, whether the budget is gone and, distributed, whether any rank
        was asked to stop. Alone this reads the local clock and flag. Distributed, rank 0's clock
        and every rank's flag are summed in the background (`RankAgreement`) and take effect
        one step later, identically on every rank, so all ranks stop at the same step with the
        same learning rates and no step waits for the host; `wait` takes them now instead."""
        seconds = time.perf_counter() - clock_start
        if self._agreement is not None:
            requested = self.stop is not None and self.stop.requested
            sent = [seconds if self.dist.is_main else 0.0, 1.0 if requested else 0.0]
            agreed = self._agreement.now(sent) if wait else self._agreement.exchange(sent)
            if agreed is None:  # the first exchange of this fit: nothing agreed yet
                return
            seconds, self._stop_agreed = agreed[0], agreed[1] > 0
        if self.max_time:
            self.train_seconds = seconds
            self.out_of_time = seconds >= self.max_time

    def _gradient_sync(self, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Across ranks, gradients are averaged once per optimizer step, after the last
        micro-batch; earlier backward passes only accumulate locally."""
        if self._ddp is not None and not last_micro_step:
            return self._ddp.no_sync()
        if self.dist.enabled and self.dist.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train from `self.step` to max_steps; raises TrainingStopped on a signal or NaN/Inf."""
        self.model.train()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        with StopSignals(on_request=self._announce_stop) as self.stop:
            try:
                summary = self._loop()
            finally:
                self.stop = None
                if self._agreement is not None:
                    with contextlib.suppress(Exception):  # a lost peer fails it; the run is ending anyway
                        self._agreement.settle()
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        return summary

    def _loop(self) -> dict[str, Any]:
        cfg = self.cfg
        interval_start, interval_tokens = time.perf_counter(), 0
        fit_start = time.perf_counter()
        clock_start = fit_start - self.train_seconds  # the budget counts the time spent before a resume
        start_step = self.step
        step_hooks = _hooks(self.callbacks, "on_step")
        self._tick(clock_start, wait=True)
        if self._eval_pending():  # saved at an eval step, but that evaluation never finished
            self._eval_or_stop()
        self._stop_if_requested()
        clock = StepClock(self.step, time.perf_counter())
        while self.step < cfg.max_steps and not self.out_of_time:
            lr = lr_at(self.step, cfg, self.progress())
            self.in_flight = self.step + 1
            loss, grad_norm = self.train_step()
            self.in_flight = None
            self._watch(loss, grad_norm)
            interval_tokens += cfg.batch_size * self.seq_len
            self._tick(clock_start)
            now = time.perf_counter()
            clock.tick(self.step, now)
            step, last = self.step, self.step == cfg.max_steps or self.out_of_time
            where = self._where(clock, now - fit_start)  # wall clock only: no host sync
            if step % self.log_every == 0 or last or step == start_step + 1:
                # the one host sync per log interval (and, distributed, the mean over ranks)
                loss_value = float(all_ranks_sum(loss.detach().float(), self.dist)) / self.dist.world_size
                record = {
                    **where, "loss": loss_value,
                    "perplexity": math.exp(min(loss_value, 700.0)), "lr": lr,
                    "grad_norm": float(grad_norm), "tokens": self.tokens_seen,
                    "tokens_per_sec": interval_tokens / max(now - interval_start, 1e-9),
                }
                for cb in self.callbacks:
                    cb.on_log(self, record)
                self.check_finite()  # already synced: costs nothing here
                interval_start, interval_tokens = time.perf_counter(), 0
            for hook in step_hooks:  # after on_log: a display never shows a step with the previous step's stats
                hook(self, where)
            pause_start = time.perf_counter()
            self._stop_if_requested()
            # Save before evaluating: an eval that crashes must not cost the steps since the last save.
            if step % cfg.save_every == 0 and not last:
                self.save(final=False)
            if (step % cfg.eval_every == 0 or last) and self.evaluate_fn is not None:
                self._eval_or_stop()
            if not last:
                self._stop_if_requested()  # asked during the save: stop here, not after one more step
            interval_start += time.perf_counter() - pause_start  # tokens/s counts training time only
        self._tick(clock_start, wait=True)
        summary = {"step": self.step, "tokens": self.tokens_seen,
                   "seconds": time.perf_counter() - fit_start,
                   "stopped_by": "max_time" if self.out_of_time and self.step < cfg.max_steps else "max_steps",
                   "val_loss": self.history[-1]["val_loss"] if self.history else None,
                   "val_perplexity": self.history[-1]["val_perplexity"] if self.history else None,
                   "best": self.best}
        self.save(final=True)
        return summary

    def _where(self, clock: StepClock, elapsed: float) -> dict[str, Any]:
        """Where the run is after a step: what `on_step` gets and every log record starts with."""
        cfg = self.cfg
        eta = clock.eta(cfg.max_steps - self.step)
        if eta is not None and self.max_time:
            eta = min(eta, max(0.0, self.max_time - self.train_seconds))
        where = {"step": self.step, "max_steps": cfg.max_steps, "eta_seconds": eta, "elapsed_seconds": elapsed,
                 "progress": self.progress() if self.max_time else self.step / cfg.max_steps}
        if self.max_time:  # the time budget, not max_steps, is the run's length
            where.update(train_seconds=self.train_seconds, max_time_seconds=self.max_time)
        return where

    def _announce_stop(self, signum: int) -> None:
        """From the signal watcher thread, the moment a stop is asked for."""
        for hook in _hooks(self.callbacks, "on_stop_requested"):
            hook(self, signum)

    def _eval_pending(self) -> bool:
        due = self.step > 0 and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps
                                 or self.out_of_time)
        return due and self.evaluate_fn is not None and not any(h["step"] == self.step for h in self.history)

    def _eval_or_stop(self) -> None:
        self.check_finite()  # an eval of NaN weights says nothing; stop before it
        if self._saved_step != self.step:
            # An evaluation can run out of memory or be killed; it must not cost the steps since
            # the last save. Checkpoint callbacks may drop this one once the eval has scored it.
            self.save(final=False, reason="eval")
        if self.stop is None or self.dist.enabled:
            # Distributed, the evaluation's all-reduce must be reached by every rank: finish it,
            # then stop at the step boundary like the others.
            self.run_eval()
            return
        try:
            with self.stop.interruptible():
                self.run_eval()
        except StopRequested:
            self._stop_if_requested()

    def _stop_requested(self) -> bool:
        """A stop asked for by a signal; distributed, any rank's request as agreed by `_tick`,
        so every rank stops at the same step (torchrun forwards a signal to all ranks, but not
        at the same instant)."""
        if self.dist.enabled:
            return self._stop_agreed
        return self.stop is not None and self.stop.requested

    def _stop_if_requested(self) -> None:
        if self._stop_requested():
            self.check_finite()
            if self._saved_step != self.step:
                self.save(final=False, reason="stop")
            raise TrainingInterrupted(self.stop.signum or signal.SIGTERM, self.step)

    # ------------------------------------------------------------------ NaN guard and saving

    def _watch(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Remember the first step whose loss (or, without a grad scaler, gradient norm) is
        not finite — on the device, without a host sync."""
        values = torch.stack([loss.detach().float(), grad_norm.detach().float()])  # (2,)
        finite = torch.isfinite(values[0]) if self.scaler else torch.isfinite(values).all()
        first = finite.logical_not() & (self._bad_step == 0)
        self._bad_step = torch.where(first, self.step, self._bad_step)
        self._bad_values = torch.where(first, values, self._bad_values)

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if any step so far was not finite (one host sync)."""
        if self._checked_good == self.step:
            return
        bad = int(self._bad_step)
        if bad:
            loss, norm = self._bad_values.tolist()
            raise NonFiniteLoss(bad, loss, norm)
        self._checked_good = self.step

    def save(self, final: bool, reason: str = "schedule") -> None:
        """Ask the callbacks to save the current state, after checking that it is finite.

        `save_reason` tells them why: "schedule" (save_every), "eval" (guarding an evaluation),
        "stop" (a signal) or "final"."""
        self.check_finite()
        self.save_reason = "final" if final else reason
        if self.dist.enabled:
            self._rank_rng = gather_to_all(rng_state(), self.dist)  # a collective: every rank takes part
        if self.dist.enabled and self.dist.strategy == "fsdp":
            self._gathered_state = self.state_dict()  # a collective: every rank takes part
        try:
            for cb in self.callbacks:
                cb.on_save(self, final=final)
        finally:
            self._gathered_state = None
            self._rank_rng = None
        self._saved_step = self.step

    def run_eval(self) -> dict[str, Any]:
        for hook in _hooks(self.callbacks, "on_eval_start"):
            hook(self)
        self.evaluating = True
        try:
            result = self.evaluate_fn()
        finally:
            self.evaluating = False
        best = self.best
        record = {"step": self.step, "tokens": self.tokens_seen, "val_loss": result["loss"],
                  "val_perplexity": result["perplexity"], "val_tokens": result["tokens"],
                  "eval_seconds": result["seconds"],
                  "best": math.isfinite(result["loss"]) and (best is None or result["loss"] < best["val_loss"])}
        if "bits_per_byte" in result:
            record["val_bits_per_byte"] = result["bits_per_byte"]
        for key, value in result.get("mixture", {}).items():  # the network mixed with counts, beside it
            if key != "loss_sum":
                record[f"val_mixture_{key}"] = value
        self.history.append(record)
        for cb in self.callbacks:
            cb.on_eval(self, record)
        return record

    @property
    def best(self) -> dict[str, Any] | None:
        """The evaluation record with the lowest validation loss so far."""
        scored = [h for h in self.history if math.isfinite(h["val_loss"])]
        return min(scored, key=lambda h: h["val_loss"]) if scored else None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything `fit()` depends on, as tensors and plain values (weights_only-loadable).
        Under FSDP the full (unsharded) state, gathered to CPU: it loads on one device."""
        if self._gathered_state is not None:
            return self._gathered_state
        model_state, optimizer_state = self._model_and_optimizer_state()
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data_position": self.batches.state_dict(),
            "rng": rng_state(),
            "history": list(self.history),
            "train_seconds": self.train_seconds,
        }
        if self._rank_rng is not None:  # distributed: every rank's RNG state, in rank order
            state["rank_rng"] = self._rank_rng
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Full (unsharded) states whatever the strategy, the optimizer's keyed by parameter
        name rather than position, so a checkpoint resumes under any world size or strategy."""
        if not torch.distributed.is_available():  # some macOS/Windows builds
            return self.model.state_dict(), {"optimizers": [o.state_dict() for o in self.optimizers]}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.model, self.optimizers,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_rng(self, state: dict[str, Any]) -> None:
        """This rank's RNG state as saved; under another number of processes (or from a
        single-process checkpoint) rank 0 takes the saved main stream and the others split
        from it, as at a fresh start."""
        saved = state.get("rank_rng")
        if self.dist.enabled and saved is not None and len(saved) == self.dist.world_size:
            set_rng_state(saved[self.dist.rank])
            return
        set_rng_state(state["rng"])
        if self.dist.enabled:
            split_rng_stream(self.dist.rank)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if torch.distributed.is_available():
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                set_state_dict(self.model, self.optimizers, model_state_dict=state["model"],
                               optim_state_dict=state["optimizer"],
                               options=StateDictOptions(full_state_dict=True))
            else:
                self.model.load_state_dict(state["model"])
                saved = state["optimizer"]
                # {"optimizers": [...]}, one state per optimizer; an older checkpoint holds one AdamW state
                saved = saved["optimizers"] if "optimizers" in saved else [saved]
                for optimizer, optimizer_state in zip(self.optimizers, saved, strict=True):
                    optimizer.load_state_dict(optimizer_state)
            self.batches.load_state_dict(state["data_position"])
            self._load_rng(state)
            if self.scaler is not None and "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise LlmctlError(f"the checkpoint's training state does not fit this run: {first}") from None
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.history = list(state.get("history", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._checked_good = self.step
        self._saved_step = self.step  # its checkpoint exists already
