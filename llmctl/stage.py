"""What every training stage (pretrain, sft) shares once its inputs are checked: the run
directory and its files, the progress display and log, checkpoints, the Trainer, resume and
the one-line account of a stop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmctl.atomic import write_text_atomic
from llmctl.config import Config
from llmctl.data.batches import BatchSource
from llmctl.data.tokenizer import TextTokenizer
from llmctl.phases import Phases
from llmctl.progress import MetricsCallback, ProgressCallback, RunLog
from llmctl.resume import ResumePoint
from llmctl.retention import CheckpointCallback
from llmctl.runlock import held, keep_lock_only
from llmctl.runtime import DistInfo, barrier, resolve_compile, signal_name
from llmctl.trackers import Reporting, check_trackers
from llmctl.trainer import Callback, NonFiniteLoss, Trainer, TrainingInterrupted, TrainingStopped


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir).expanduser() / cfg.run.name


def say_to(console: Console) -> Callable[[str], None]:
    return lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)


def fit_stage(cfg: Config, stage: str, console: Console, *, model: torch.nn.Module, batches: BatchSource,
              evaluate: Callable[[], dict[str, float]], tokenizer: TextTokenizer, data_meta: dict[str, Any],
              device: torch.device, dtype: torch.dtype, point: ResumePoint | None, intro: list[str],
              overwrite: bool = False, resume_command: str | None = None, seq_len: int | None = None,
              checkpoint_extra: dict[str, Any] | None = None,
              callbacks: Callable[[Callable[[str], None]], list[Callback]] | None = None,
              dist_info: DistInfo | None = None, phases: Phases | None = None) -> dict[str, Any]:
    """What every training stage (pretrain, sft) shares from its first write on: the run
    directory (deleted first with `overwrite`), config.toml, the progress display and
    training.log, metrics.jsonl, `<run>-<stage>_*.pt` checkpoints (plus `checkpoint_extra`
    keys), the Trainer on `getattr(cfg, stage)`, resume from `point` (its state is consumed),
    and the one-line account of a stop. Call it only when every input has been checked, holding
    the run's lock (`llmctl.runlock.hold_run_lock`; rank 0 only under torchrun).

    `callbacks(say)` adds stage-specific callbacks that write through the progress display;
    `seq_len` is the tokens one sequence counts for (default the context length). `phases`,
    the spinner of the stage's preparation, goes on until training starts, and training.log
    gets its lines."""
    dist_info = dist_info or DistInfo()
    phases = phases or Phases(console)
    train_cfg = getattr(cfg, stage)
    run_dir = run_dir_of(cfg)
    check_trackers(cfg.run.report_to)
    barrier(dist_info)  # every rank has checked the run directory before rank 0 changes it
    lock = held(run_dir)
    if dist_info.is_main and lock is None:
        raise RuntimeError(f"fit_stage writes {run_dir} without its run lock; call it inside hold_run_lock")
    if dist_info.is_main:
        if overwrite and run_dir.is_dir():
            keep_lock_only(run_dir)  # the lock stays held: no second writer slips in while this one restarts
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.toml", cfg.to_toml())
    progress = ProgressCallback(console, RunLog(run_dir / "training.log" if dist_info.is_main else None),
                                title=f"{cfg.run.name} {stage}")
    if lock is not None and lock.note:
        progress.log.write(lock.note)  # the console had it when the lock was taken; the log keeps it
    phases.log_to(progress.log.write)  # the phases so far were shown before this log existed
    checkpoints = CheckpointCallback(run_dir, cfg, stage, tokenizer, data_meta, train_cfg.keep_last,
                                     extra=checkpoint_extra)
    reporting = Reporting(cfg, run_dir, stage, progress.say, progress.log.write)  # status.json, trackers, loss.png
    own = [progress, MetricsCallback(run_dir / "metrics.jsonl"), checkpoints, *reporting.callbacks,
           *(callbacks(progress.say) if callbacks else [])]
    trainer = Trainer(model, train_cfg, batches=batches, evaluate=evaluate, device=device, dtype=dtype,
                      seq_len=seq_len or cfg.train_seq_len(stage), log_every=cfg.run.log_every,
                      compile=resolve_compile(cfg.run.compile, device),
                      callbacks=own if dist_info.is_main else [], dist=dist_info)
    if point is not None:
        phases(f"restoring the training state of {point.path.name} …")
        trainer.load_state_dict(point.state)
        checkpoints.last_path = point.path
        point.state.clear()  # free the loaded tensors: the trainer holds its own copy now
    for line in intro:
        progress.say(line)
    if point is not None:
        progress.say(f"resumed from {point.path.name} at step {trainer.step} ({trainer.tokens_seen:,} tokens seen)")
        for note in point.notes:
            progress.say(note)
    phases.stop()  # the progress bar takes over from here (Rich shows one live display at a time)
    try:
        with reporting.watch(trainer):  # a stop or crash is recorded in status.json too
            summary = trainer.fit()
    except TrainingStopped as e:
        e.args = (stop_message(e, checkpoints.last_path, resume_command, stage),)
        progress.log.write(str(e))
        raise
    finally:
        progress.close()
    summary["checkpoint"] = str(checkpoints.last_path) if dist_info.is_main else None  # only rank 0 saves
    summary["run_dir"] = str(run_dir)
    progress.say(f"done: {summary['step']} steps, {summary['tokens']:,} tokens in "
                 f"{summary['seconds']:.1f}s; final checkpoint {checkpoints.last_path}")
    return summary


def stop_message(error: TrainingStopped, checkpoint: Path | None, resume_command: str | None, section: str) -> str:
    """The one line a stopped run ends with: what happened, what was saved, what to type next."""
    if isinstance(error, TrainingInterrupted):
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint saved"
        how = f"resume with: {resume_command}" if resume_command else "resume with the same command plus --resume"
        return f"stopped by {signal_name(error.signum)} at step {error.step}; {saved}; {how}"
    if isinstance(error, NonFiniteLoss):
        what = f"loss {error.loss:.4g}, gradient norm {error.grad_norm:.4g}"
        if checkpoint:
            good = f"the last good checkpoint is {checkpoint} (nothing was saved after it)"
            then = (f"then continue from it: {_without_set(resume_command, f'{section}.lr')} --set {section}.lr=<lower>"
                    if resume_command else "then continue from it with --resume")
        else:
            good = "no checkpoint had been saved yet"
            then = "then start again with --overwrite"
        return (f"training diverged at step {error.step} ({what}); {good}; try a lower {section}.lr "
                f"or more {section}.warmup_steps, run.dtype=bfloat16 instead of float16, or "
                f"{section}.grad_clip=1.0; {then}")
    return str(error)


def _without_set(command: str, key: str) -> str:
    """A shell command line minus its `--set KEY=...` options (the hint adds a new value)."""
    import shlex

    args, kept = shlex.split(command), []
    for i, arg in enumerate(args):
        if arg.startswith(f"{key}=") and i > 0 and args[i - 1] == "--set":
            kept.pop()
            continue
        kept.append(arg)
    return shlex.join(kept)
