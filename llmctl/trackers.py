"""What a run records about itself besides checkpoints and metrics.jsonl.

- `StatusCallback`: status.json — running / finished / interrupted / failed (see `llmctl.runs`).
- `TensorBoardCallback`, `WandbCallback` (`run.report_to = ["tensorboard", "wandb"]`): the
  same records as metrics.jsonl, the training ones under `train/<key>`, the evaluations
  under `eval/<key>`, at their step. Each needs an optional extra; `check_trackers` names
  the missing one before any work starts. TensorBoard purges the events past the resumed
  step, as metrics.jsonl is cut back; wandb keeps one run id per run directory (in
  `wandb_run_id`) and resumes it, and honours `WANDB_MODE=offline` and `WANDB_PROJECT`.
- `PlotCallback`: loss.png in the run directory when training ends, if matplotlib is
  installed (else a note in training.log, nothing on the console).

`Reporting` bundles them for a training stage: its `callbacks` go to the Trainer, and its
`watch()` wraps `trainer.fit()` so that a stop or a crash is recorded too (callbacks see
only successful ends). Recording a stop never masks the error that caused it, and a plot
that fails is a note in the log, never a failed run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmctl.config import Config
from llmctl.errors import LlmctlError
from llmctl.runs import now_iso, this_process, write_status
from llmctl.trainer import Callback, Trainer, TrainingInterrupted

# report_to name -> (module that must be importable, the llmctl extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_trackers(names: list[str]) -> None:
    """Fail before training if a configured tracker's package is missing (one line, the extra to install)."""
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise LlmctlError(f'run.report_to includes "{name}" but the {module} package is not installed; '
                              f'pip install "llmctl[{extra}]", or remove "{name}" from run.report_to')


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record, minus its step (the x axis)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "type", "max_steps") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class StatusCallback(Callback):
    def __init__(self, run_dir: Path, stage: str):
        self.run_dir = run_dir
        self.stage = stage
        self.record: dict[str, Any] | None = None

    def _write(self, trainer: Trainer | None = None, **fields: Any) -> None:
        if self.record is None:
            return
        if trainer is not None:
            self.record.update(step=trainer.step, tokens=trainer.tokens_seen)
        self.record.update(fields, updated_at=now_iso())
        write_status(self.run_dir, self.record)

    def on_fit_start(self, trainer: Trainer) -> None:
        self.record = {"state": "running", "stage": self.stage, "max_steps": trainer.cfg.max_steps,
                       "started_at": now_iso(), **this_process()}
        self._write(trainer)

    def on_save(self, trainer: Trainer, final: bool) -> None:
        self._write(trainer)  # rare and cheap: keeps the step current for `llmctl runs`

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self._write(trainer, state="finished", ended_at=now_iso(), reason="")

    def on_stop(self, trainer: Trainer, error: BaseException) -> None:
        interrupted = isinstance(error, (TrainingInterrupted, KeyboardInterrupt))
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not interrupted and not isinstance(error, LlmctlError):
            text = f"{type(error).__name__}: {text}"
        self._write(trainer, state="interrupted" if interrupted else "failed", ended_at=now_iso(),
                    reason=text[:300], exit_code=getattr(error, "exit_code", 130 if interrupted else 1))


class TensorBoardCallback(Callback):
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.writer: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events after the checkpoint's step (a crashed attempt's) are dropped.
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=trainer.step + 1 if trainer.step else None)

    def _add(self, prefix: str, record: dict[str, Any]) -> None:
        for key, value in _numbers(record).items():
            if math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._add("train", record)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._add("eval", record)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.close()

    def on_stop(self, trainer: Trainer, error: BaseException) -> None:
        self.close()


class WandbCallback(Callback):
    def __init__(self, cfg: Config, run_dir: Path, stage: str):
        self.cfg = cfg
        self.run_dir = run_dir
        self.stage = stage
        self.run: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        import wandb

        id_file = self.run_dir / "wandb_run_id"  # one wandb run per run directory, resumed with it
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llmctl"), name=self.cfg.run.name,
                              id=run_id, resume="allow", dir=str(self.run_dir), config=self.cfg.to_dict(),
                              job_type=self.stage)

    def _log(self, prefix: str, record: dict[str, Any]) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in _numbers(record).items()}, step=record["step"])

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._log("train", record)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._log("eval", record)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def on_stop(self, trainer: Trainer, error: BaseException) -> None:
        if self.run is not None:
            self.run.finish(exit_code=getattr(error, "exit_code", 1))
            self.run = None


class PlotCallback(Callback):
    """loss.png in the run directory at the end; `say` reaches console and log, `note` the log only."""

    def __init__(self, run_dir: Path, say: Callable[[str], None], note: Callable[[str], None]):
        self.run_dir = run_dir
        self.say = say
        self.note = note

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if importlib.util.find_spec("matplotlib") is None:
            self.note('loss.png not drawn: matplotlib is not installed (pip install "llmctl[plot]")')
            return
        from llmctl.plot import plot_runs

        out = self.run_dir / "loss.png"
        try:
            plot_runs([self.run_dir], out)
        except Exception as e:  # a picture must never fail a finished run
            self.note(f"loss.png not drawn: {type(e).__name__}: {str(e)[:200]}")
            return
        self.say(f"loss curves: {out}")


class Reporting:
    """The status record, the configured trackers and the end-of-run plot for one training stage."""

    def __init__(self, cfg: Config, run_dir: Path, stage: str, say: Callable[[str], None],
                 note: Callable[[str], None]):
        self.callbacks: list[Callback] = [StatusCallback(run_dir, stage)]
        for name in cfg.run.report_to:
            if name == "tensorboard":
                self.callbacks.append(TensorBoardCallback(run_dir / "tensorboard"))
            elif name == "wandb":
                self.callbacks.append(WandbCallback(cfg, run_dir, stage))
        self.callbacks.append(PlotCallback(run_dir, say, note))

    @contextlib.contextmanager
    def watch(self, trainer: Trainer) -> Iterator[None]:
        """Around `trainer.fit()`: a signal stop, NaN or crash is recorded, then re-raised unchanged."""
        try:
            yield
        except BaseException as error:
            for cb in self.callbacks:
                stop = getattr(cb, "on_stop", None)
                if stop is not None:
                    with contextlib.suppress(Exception):  # never mask the real error
                        stop(trainer, error)
            raise
