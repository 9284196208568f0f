"""What a person sees while training, and the run's log files.

`ProgressCallback` owns the console: on a terminal a Rich live bar with step, loss,
perplexity, lr, tokens/s, ETA and the last validation perplexity; otherwise plain lines.
Either way the same lines go to `training.log`. The bar's step, fraction and ETA follow every
optimizer step (from the wall clock: no device sync); loss and the rest change at log steps.
Until the first step completes it says so ("first step (compiles and warms up) …"), and a
stop signal is acknowledged the moment it arrives ("finishing step N, then saving").
`MetricsCallback` appends one JSON object per logged step and per eval to `metrics.jsonl`
for scripts and plots.

On resume from step k, `metrics.jsonl` is cut back to what the checkpoint knew (records up
to step k, and only the evaluations in its history) so that a crashed attempt's later
records do not appear twice; training.log keeps everything, since it is a diary.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

from llmctl.runtime import signal_name
from llmctl.trainer import Callback, Trainer

UNKNOWN_ETA = "-:--:--"


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def position(r: dict[str, Any]) -> str:
    """Where a run is: "step 40/100", or with a time budget "step 2,317, 4:10 of 10:00"."""
    if "max_time_seconds" in r:
        return (f"step {r['step']:,}, {format_duration(r['train_seconds'])} of "
                f"{format_duration(r['max_time_seconds'])}")
    return f"step {r['step']}/{r['max_steps']}"


def step_line(r: dict[str, Any]) -> str:
    return (f"{position(r)} | loss {r['loss']:.4f} | ppl {r['perplexity']:.2f} | "
            f"lr {r['lr']:.2e} | grad_norm {r['grad_norm']:.3f} | {r['tokens_per_sec']:,.0f} tok/s | "
            f"eta {format_duration(r['eta_seconds'])}")


def eta_text(seconds: float | None) -> str:
    return UNKNOWN_ETA if seconds is None else format_duration(seconds)


def first_step_text(trainer: Trainer) -> str:
    """What the wait for the first step is, which can be the longest of the run (compiling)."""
    which = "first step" if trainer.step == 0 else f"first step after resuming (step {trainer.step + 1})"
    return f"{which} (compiles and warms up) …" if trainer.compiles_first_step else f"{which} …"


def stop_notice(trainer: Trainer, signum: int) -> str:
    """The acknowledgement of a stop signal: what happens now, and how to skip it."""
    again = "Ctrl-C again to quit now" if signum == signal.SIGINT else "a second signal quits now"
    in_flight = trainer.in_flight  # read once: the main thread changes it
    if trainer.dist.enabled:  # every process stops at the step they agree on, a step after the request
        what = "stopping at the next step all processes agree on, then saving"
    elif trainer.evaluating:  # alone, an evaluation is abandoned at once
        what = f"abandoning the evaluation (step {trainer.step} is saved)"
    elif in_flight is not None:
        what = f"finishing step {in_flight}, then saving"
    else:
        what = f"stopping at step {trainer.step}, then saving"
    return f"{signal_name(signum)}: {what} — {again}"


def eval_line(r: dict[str, Any]) -> str:
    mixture = (f" | with counts: val_loss {r['val_mixture_loss']:.4f} | val_ppl {r['val_mixture_perplexity']:.2f}"
               if "val_mixture_loss" in r else "")
    return (f"eval step {r['step']} | val_loss {r['val_loss']:.4f} | val_ppl {r['val_perplexity']:.2f}{mixture} | "
            f"{r['val_tokens']:,} tokens in {r['eval_seconds']:.1f}s")


class RunLog:
    """Plain lines, timestamped, appended to the run's training.log (no file: None, as on the
    non-zero ranks of a distributed run)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, line: str, at: datetime.datetime | None = None) -> None:
        """Append `line`, stamped now or at `at` (a phase that began before the log existed)."""
        if self.path is None:
            return
        stamp = (at or datetime.datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")


class ProgressCallback(Callback):
    def __init__(self, console: Console, log: RunLog, title: str):
        self.console = console
        self.log = log
        self.title = title
        self.live = console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._train_stats = ""  # loss, ppl, lr, tok/s of the last logged step
        self._waiting = ""  # what the bar says until the first step of this fit is logged
        self._last_val = "-"

    def say(self, line: str) -> None:
        """A line for both the console and the log file (safe from another thread: Rich locks)."""
        self.log.write(line)
        progress = self._progress
        if progress is not None:
            progress.console.print(line, markup=False, highlight=False)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _show(self, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)

    def _stats(self) -> str:
        return f"{self._train_stats}  val ppl {self._last_val}" if self._train_stats else self._waiting

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.history:  # resumed: show the last validation from before the stop
            self._last_val = f"{trainer.history[-1]['val_perplexity']:.2f}"
        waiting = self._waiting = first_step_text(trainer)
        if not self.live:
            self.say(waiting)
            return
        self.log.write(waiting)
        # The bar runs over the run's fraction done: steps, or time with a time budget. The
        # spinner keeps turning through a long step, so a live run never looks frozen.
        self._progress = Progress(
            SpinnerColumn(finished_text=" "), TextColumn(f"[bold]{self.title}[/]"), BarColumn(),
            TextColumn("{task.fields[position]}"), TextColumn("{task.fields[stats]}"),
            TextColumn("eta {task.fields[eta]}"), console=self.console, transient=False)
        where = {"step": trainer.step, "max_steps": trainer.cfg.max_steps}
        if trainer.max_time:
            where.update(train_seconds=trainer.train_seconds, max_time_seconds=trainer.max_time)
        self._task = self._progress.add_task(self.title, total=1.0,
                                             completed=trainer.progress() or trainer.step / trainer.cfg.max_steps,
                                             position=position(where), stats=waiting, eta=UNKNOWN_ETA)
        self._progress.start()

    def on_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        # Every optimizer step: a few field assignments under Rich's lock; the refresh thread draws.
        self._show(completed=record["progress"], position=position(record), eta=eta_text(record["eta_seconds"]))

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.log.write(step_line(record))
        if self._progress is None:
            self.console.print(step_line(record), markup=False, highlight=False, soft_wrap=True)
            return
        self._train_stats = (f"loss {record['loss']:.3f}  ppl {record['perplexity']:.1f}  lr {record['lr']:.1e}  "
                             f"{record['tokens_per_sec']:,.0f} tok/s")
        self._show(completed=record["progress"], position=position(record), stats=self._stats(),
                   eta=eta_text(record["eta_seconds"]))

    def on_eval_start(self, trainer: Trainer) -> None:
        self._show(stats=f"{self._train_stats}  evaluating …".strip())

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._last_val = f"{record['val_perplexity']:.2f}"
        self._show(stats=self._stats(), refresh=True)  # drawn now: a printed line repeats the last drawing
        self.say(eval_line(record))

    def on_stop_requested(self, trainer: Trainer, signum: int) -> None:
        # Runs on the signal watcher thread while the main thread may be deep in a step.
        self.say(stop_notice(trainer, signum))

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class MetricsCallback(Callback):
    def __init__(self, path: Path):
        self.path = path

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.step > 0 and self.path.is_file():
            self.truncate(trainer.step, {h["step"] for h in trainer.history})

    def truncate(self, step: int, eval_steps: set[int]) -> None:
        """Keep records up to `step`, and evaluation records only at `eval_steps`; atomic."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            at = record.get("step", 0) if isinstance(record, dict) else 0
            if at <= step and (record.get("type") != "eval" or at in eval_steps):
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._append({"type": "train", **record})

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._append({"type": "eval", **record})
