"""What a person sees while training, and the run's log files.

`ProgressCallback` owns the console: on a terminal a Rich live bar with step, loss,
perplexity, lr, tokens/s, ETA and the last validation perplexity; otherwise plain lines.
Either way the same lines go to `training.log`. `MetricsCallback` appends one JSON object
per logged step and per eval to `metrics.jsonl` for scripts and plots.

On resume from step k, `metrics.jsonl` is cut back to what the checkpoint knew (records up
to step k, and only the evaluations in its history) so that a crashed attempt's later
records do not appear twice; training.log keeps everything, since it is a diary.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from llmctl.trainer import Callback, Trainer


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

    def write(self, line: str) -> None:
        if self.path is None:
            return
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
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
        self._last_val = "-"

    def say(self, line: str) -> None:
        """A line for both the console and the log file."""
        self.log.write(line)
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.history:  # resumed: show the last validation from before the stop
            self._last_val = f"{trainer.history[-1]['val_perplexity']:.2f}"
        if self.live:
            # The bar runs over the run's fraction done: steps, or time with a time budget.
            self._progress = Progress(
                TextColumn(f"[bold]{self.title}[/]"), BarColumn(), TextColumn("{task.fields[position]}"),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._task = self._progress.add_task(self.title, total=1.0,
                                                 completed=trainer.progress() or trainer.step / trainer.cfg.max_steps,
                                                 position=f"step {trainer.step}", stats="starting…")
            self._progress.start()

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.log.write(step_line(record))
        if self._progress is not None:
            stats = (f"loss {record['loss']:.3f}  ppl {record['perplexity']:.1f}  lr {record['lr']:.1e}  "
                     f"{record['tokens_per_sec']:,.0f} tok/s  val ppl {self._last_val}")
            self._progress.update(self._task, completed=record["progress"], position=position(record), stats=stats)
        else:
            self.console.print(step_line(record), markup=False, highlight=False, soft_wrap=True)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._last_val = f"{record['val_perplexity']:.2f}"
        self.say(eval_line(record))

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
