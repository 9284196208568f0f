"""Checkpoints: one self-contained file, written atomically, loaded without unpickling code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts — model and
optimizer state, the resolved config, step and tokens seen, RNG and data position, the
evaluation history, the tokenizer's JSON and a format version — so
`torch.load(path, weights_only=True)` opens it and nothing in it can run code. Writes go to
a temporary file in the same folder, are flushed and fsynced, then renamed over the target:
a crash (even `kill -9`) at any instant leaves either the old file or the new one, never half
of one; a stray `.NAME.*.tmp` from a killed writer is removed when the next run starts.

Resuming (`--resume`) picks the newest loadable checkpoint of a stage by step (a final
checkpoint counts at its step), and refuses a config that differs from the checkpoint's
except in keys that are safe to change (`RESUME_SAFE`, `RESUME_SAFE_TRAINING`): where and
how fast to run, how long, how often to log, evaluate and save, and the two knobs a
diverged run needs (lr, grad_clip). Retention (`keep_last`) deletes old step checkpoints
but never the final one nor the one with the best validation loss.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.atomic import atomic_write
from llmctl.config import Config, parse_duration
from llmctl.data.tokenizer import TextTokenizer
from llmctl.errors import ConfigError, LlmctlError
from llmctl.runtime import partial_file
from llmctl.trainer import Callback, Trainer

FORMAT_VERSION = 1
KIND = "llmctl-checkpoint"
RESUME_KEYS = ("model", "optimizer", "step", "tokens_seen", "data_position", "rng", "config")


def checkpoint_path(run_dir: Path, run_name: str, stage: str, step: int | None) -> Path:
    """`<run>-<stage>_step{N}.pt`, or `<run>-<stage>_final.pt` when step is None."""
    suffix = "final" if step is None else f"step{step}"
    return run_dir / f"{run_name}-{stage}_{suffix}.pt"


# --------------------------------------------------------------------------- write and read

def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: temp file in the same folder, flush + fsync, rename, fsync the folder."""
    payload = {"kind": KIND, "format_version": FORMAT_VERSION, **payload}
    # partial_file: a second Ctrl-C deletes the temporary file rather than leave half a file
    atomic_write(path, lambda f: torch.save(payload, f), guard=partial_file)
    _fsync_dir(path.parent)  # make the rename itself durable


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check an llmctl checkpoint with weights_only=True; every failure is one LlmctlError line."""
    path = Path(path)
    if path.is_dir():
        raise LlmctlError(f"{path} is a folder, not a checkpoint file; pass a .pt file (or the run "
                          f"directory where a command accepts one)")
    if not path.is_file():
        raise LlmctlError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise LlmctlError(f"{path} is empty (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or a (legacy) pickle
        raise LlmctlError(f"{path} is not a readable checkpoint: not a PyTorch file (text, or another "
                          f"format?); pass an llmctl .pt file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on foreign files
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        what = f"it would import {found[1]}" if found else "it holds pickled objects that are not plain data"
        raise LlmctlError(f"{path} was refused: {what}; llmctl loads only tensors and plain values "
                          f"(weights_only) and never unpickles code") from None
    except MemoryError:
        raise LlmctlError(f"{path} does not fit in memory") from None
    except Exception as e:  # a damaged zip or pickle stream fails in many ways (EOF, KeyError, ...)
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise LlmctlError(f"{path} is not a readable checkpoint (truncated or corrupted?): {first}") from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise LlmctlError(f"{path} is a PyTorch file but not an llmctl checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise LlmctlError(f"{path} has checkpoint format {version}; this llmctl reads format "
                          f"{FORMAT_VERSION} — use the llmctl version that wrote it")
    return payload


def require_keys(payload: dict[str, Any], path: Path, keys: tuple[str, ...] = RESUME_KEYS) -> None:
    """A checkpoint to resume from must hold the whole training state, not just weights."""
    missing = [k for k in keys if k not in payload]
    if missing:
        raise LlmctlError(f"{path} cannot be resumed from: it lacks {', '.join(missing)} "
                          f"(a weights-only or damaged checkpoint)")


# --------------------------------------------------------------------------- run directories

_STEP = re.compile(r"-(?P<stage>[a-z]+)_step(?P<step>\d+)\.pt$")
_PARTIAL = re.compile(r"^\..+\.pt\..+\.tmp$")


def step_checkpoints(run_dir: Path, stage: str | None = None) -> list[tuple[int, Path]]:
    """(step, path) of the step checkpoints in a run directory, oldest first."""
    found = []
    for p in run_dir.glob("*_step*.pt"):
        m = _STEP.search(p.name)
        if m and (stage is None or m["stage"] == stage):
            found.append((int(m["step"]), p))
    return sorted(found)


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Every llmctl checkpoint file of any stage in a run directory."""
    if not run_dir.is_dir():
        return []
    return sorted({p for _, p in step_checkpoints(run_dir)} | set(run_dir.glob("*_final.pt")))


def resolve_checkpoint(path_or_dir: str | Path) -> Path:
    """A checkpoint file, or a run directory (its final checkpoint, else its latest step)."""
    p = Path(path_or_dir).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        finals = sorted(p.glob("*_final.pt"), key=lambda f: f.stat().st_mtime)
        if finals:
            return finals[-1]
        steps = step_checkpoints(p)
        if steps:
            return steps[-1][1]
        raise LlmctlError(f"{p} holds no llmctl checkpoint (*_final.pt or *_step<N>.pt)")
    raise LlmctlError(f"checkpoint not found: {p}; pass a .pt file or a run directory")


def remove_partial_files(run_dir: Path) -> list[Path]:
    """Delete `.NAME.pt.*.tmp` files that a killed writer left behind; they are never checkpoints."""
    removed = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if _PARTIAL.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


RESUME_AUTO = "auto"  # `--resume auto`: resume when the run has a checkpoint of its stage, else start fresh


def check_run_dir(run_dir: Path, *, resume: bool | str, overwrite: bool, stage: str | None = None,
                  existed: bool | None = None) -> bool:
    """Refuse to start over a run's checkpoints unless told to; refuse to resume nothing.

    Returns whether to resume. `resume=RESUME_AUTO` (needs `stage`) resumes when the run holds a
    checkpoint of `stage`, and otherwise is a fresh start under a fresh start's rules: elastic
    restarts (`torchrun --max-restarts`) repeat one command line for the first attempt and the
    rest. `existed` says whether the folder was there before this command (its run lock may
    have just created it); default: whether it is there now."""
    if resume and overwrite:
        flag = "--resume auto" if resume == RESUME_AUTO else "--resume"
        raise ConfigError(f"{flag} and --overwrite contradict each other: {flag} continues the run "
                          f"in its directory, --overwrite deletes it and starts again; pass one")
    if resume == RESUME_AUTO:
        if stage is None:
            raise ValueError("resume='auto' needs the stage whose checkpoints count")
        resume = bool(step_checkpoints(run_dir, stage) or list(run_dir.glob(f"*-{stage}_final.pt")))
    existing = all_checkpoints(run_dir)
    if resume and not existing:
        there = run_dir.is_dir() if existed is None else existed
        where = f"{run_dir} holds no checkpoint" if there else f"{run_dir} does not exist"
        raise LlmctlError(f"nothing to resume: {where}; check --run-name (and run.output_dir), "
                          f"or drop --resume to start a new run")
    if existing and not resume and not overwrite:
        count = f"{len(existing)} checkpoint{'s' if len(existing) > 1 else ''}"
        raise LlmctlError(f"{run_dir} already holds {count}; pass --resume "
                          f"to continue that run, --overwrite to delete it and start again, "
                          f"or choose another --run-name")
    return bool(resume)


def newest_checkpoint(run_dir: Path, stage: str) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest loadable checkpoint of `stage` (by step; a final one counts at its step).

    Returns (path, payload, notes): a newer file that cannot be loaded is skipped with a note
    rather than ending the resume, since an older good one exists. With none loadable the
    error names the newest file and why it failed."""
    candidates: list[tuple[int, int, Path]] = [(step, 0, p) for step, p in step_checkpoints(run_dir, stage)]
    notes: list[str] = []
    loaded: dict[Path, dict[str, Any]] = {}
    final = next(iter(run_dir.glob(f"*-{stage}_final.pt")), None)
    first_error: LlmctlError | None = None
    if final is not None:
        try:
            loaded[final] = load_checkpoint(final)
            require_keys(loaded[final], final)
            candidates.append((int(loaded[final]["step"]), 1, final))  # at equal steps the final wins
        except LlmctlError as e:
            first_error = e
            notes.append(f"skipped {final.name}: {e}")
    for _, _, path in sorted(candidates, reverse=True):
        try:
            payload = loaded.get(path) or load_checkpoint(path)
            require_keys(payload, path)
            if payload.get("stage", stage) != stage:
                raise LlmctlError(f"{path} is a {payload.get('stage')} checkpoint, not {stage}")
            return path, payload, notes
        except LlmctlError as e:
            first_error = first_error or e
            notes.append(f"skipped {path.name}: {e}")
    if first_error is not None:
        raise LlmctlError(f"no loadable {stage} checkpoint to resume in {run_dir}: {first_error}")
    raise LlmctlError(f"nothing to resume: {run_dir} holds no {stage} checkpoint; drop --resume "
                      f"to start a new run")


# --------------------------------------------------------------------------- resume config

# Keys that may differ between a checkpoint and the run resuming it. They change where and how
# fast the run computes, how long it goes and how often it logs, evaluates and saves — not
# what is trained. lr and grad_clip are here because changing them is the fix for a diverged
# run (the NaN guard's advice); the continuation is then no longer exact, and is announced.
RESUME_SAFE = {"run.name", "run.output_dir", "run.device", "run.dtype", "run.compile", "run.log_every", "run.report_to",
               "data.cache_dir", "model.gradient_checkpointing", "eval.*"}
RESUME_SAFE_TRAINING = {"max_steps", "max_time", "eval_every", "save_every", "keep_last", "lr", "grad_clip"}
RESUME_SECTIONS = ("run", "data", "model", "eval")  # plus the training stage's own section


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in tree.items() if isinstance(values, dict)
            for key, value in values.items()}


def _is_safe(key: str, stage: str) -> bool:
    section, name = key.split(".", 1)
    if section == stage:
        return name in RESUME_SAFE_TRAINING
    return key in RESUME_SAFE or f"{section}.*" in RESUME_SAFE


def resume_config_changes(saved: dict[str, Any], current: dict[str, Any], stage: str) -> list[str]:
    """Compare the checkpoint's config with this run's. Unsafe differences raise one ConfigError
    listing them all; safe ones come back as `key: old -> new` notes to show the user.

    Only the sections this stage trains with are compared, and only keys present in both
    (a key added by a newer llmctl does not block resuming an older run)."""
    old, new = _flatten(saved), _flatten(current)
    sections = set(RESUME_SECTIONS) | {stage}
    # micro_batch_size = "auto" was resolved to a number when the run started; it resumes with that one.
    resolved = {f"{stage}.micro_batch_size"}
    changed = [k for k in sorted(old.keys() & new.keys())
               if k.split(".", 1)[0] in sections and old[k] != new[k] and not (k in resolved and new[k] == "auto")]
    unsafe = [k for k in changed if not _is_safe(k, stage)]
    if unsafe:
        shown = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in unsafe[:8])
        more = f" and {len(unsafe) - 8} more" if len(unsafe) > 8 else ""
        allowed = ", ".join(sorted(k for k in RESUME_SAFE if k != "run.name")
                            + [f"{stage}.{k}" for k in sorted(RESUME_SAFE_TRAINING)])
        raise ConfigError(f"cannot resume: the config differs from the checkpoint's in {shown}{more}; "
                          f"pass the original preset and --set values (only {allowed} may change), "
                          f"or start a new run with another --run-name")
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed if k != "run.name"]


@dataclass
class ResumePoint:
    """Where a resumed run starts: the checkpoint, its payload, and notes to show the user."""

    path: Path
    state: dict[str, Any]
    notes: list[str]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def find_resume_point(run_dir: Path, stage: str, cfg: Config, tokenizer: TextTokenizer) -> ResumePoint:
    """The newest loadable checkpoint of `stage`, checked against this run's config and tokenizer."""
    path, state, notes = newest_checkpoint(run_dir, stage)
    changes = resume_config_changes(state["config"], cfg.to_dict(), stage)
    saved_tok = state.get("tokenizer", {}).get("fingerprint")
    if saved_tok and saved_tok != tokenizer.fingerprint:
        raise ConfigError(f"cannot resume from {path}: it was trained with another tokenizer than "
                          f"data.tokenizer={cfg.data.tokenizer}; use the original tokenizer")
    max_steps = getattr(cfg, stage).max_steps
    step = int(state["step"])
    if step > max_steps or (step == max_steps and path.name.endswith("_final.pt")):
        raise ConfigError(f"nothing to resume: {path.name} is at step {step} and {stage}.max_steps is "
                          f"{max_steps}; raise it (e.g. --set {stage}.max_steps={step * 2}) to train further")
    budget = parse_duration(getattr(cfg, stage).max_time)
    spent = float(state.get("train_seconds", 0.0))
    if budget and spent >= budget and path.name.endswith("_final.pt"):
        raise ConfigError(f"nothing to resume: {path.name} used its whole time budget ({spent:.0f}s of "
                          f"{stage}.max_time={getattr(cfg, stage).max_time!r}); raise it (e.g. --set "
                          f"'{stage}.max_time=\"{_doubled(getattr(cfg, stage).max_time)}\"') to train further")
    return ResumePoint(path, state, notes + [f"changed on resume: {c}" for c in changes])


def _doubled(duration: str) -> str:
    """A duration twice as long, written as seconds, minutes or hours: "10m" -> "20m"."""
    seconds = 2 * parse_duration(duration)
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def check_same_data(point: ResumePoint, data_meta: dict[str, Any]) -> None:
    """The data position only means something on the same token stream: the token count and
    the fingerprint (a hash of the training data's content: `TokenStore.train_fingerprint`,
    `llmctl.data.sft.examples_fingerprint`) must match the checkpoint's. A checkpoint saved
    before fingerprints were is checked on its token count alone."""
    saved = point.state.get("data", {})
    then = saved.get("tokens", {}).get("train")
    now = data_meta.get("tokens", {}).get("train")
    if then is not None and now is not None and then != now:
        raise LlmctlError(f"cannot resume from {point.path}: the training data changed since it was saved "
                          f"({then:,} train tokens then, {now:,} now — an edited or replaced file?); "
                          f"restore the data, or start a new run with another --run-name")
    then, now = saved.get("fingerprint"), data_meta.get("fingerprint")
    if then is not None and now is not None and then != now:
        raise LlmctlError(f"cannot resume from {point.path}: the training data changed since it was saved "
                          f"(the same token count, different content — an edited or replaced file?); "
                          f"restore the data, or start a new run with another --run-name")


# --------------------------------------------------------------------------- retention

def best_checkpoint_step(history: list[dict[str, Any]], steps: set[int]) -> int | None:
    """The step, among `steps` that have a checkpoint, whose evaluation had the lowest loss.

    An evaluation at step s runs right after the checkpoint of step s is saved, on the same
    weights, so it scores that checkpoint."""
    scored = [(h["val_loss"], h["step"]) for h in history
              if h["step"] in steps and isinstance(h.get("val_loss"), float) and math.isfinite(h["val_loss"])]
    return min(scored)[1] if scored else None


def prune_step_checkpoints(run_dir: Path, stage: str, keep_last: int, protect: set[int] = frozenset(),
                           ignore: set[int] = frozenset()) -> None:
    """Keep the `keep_last` newest step checkpoints of a stage, plus those at `protect` steps;
    steps in `ignore` neither count nor get deleted; final checkpoints are never touched."""
    if keep_last <= 0:
        return
    counted = [(step, path) for step, path in step_checkpoints(run_dir, stage) if step not in ignore]
    for step, old in counted[:-keep_last]:
        if step not in protect:
            with contextlib.suppress(OSError):
                old.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointCallback(Callback):
    """Writes `<run>-<stage>_step{N}.pt` and `<run>-<stage>_final.pt`, each self-contained,
    and applies retention: the `keep_last` newest step checkpoints and the best-validation one.

    A checkpoint written only to guard an evaluation (the trainer saves before every eval) is
    deleted once that eval has scored it, unless it is the best so far: so the best
    validation weights are always on disk even when evals and saves do not line up."""

    def __init__(self, run_dir: Path, cfg: Config, stage: str, tokenizer: TextTokenizer,
                 data_meta: dict[str, Any], keep_last: int, extra: dict[str, Any] | None = None):
        self.run_dir = run_dir
        self.extra = extra or {}  # stage-specific plain values saved in every checkpoint (sft: template)
        self.cfg = cfg
        self.stage = stage
        self.tokenizer = tokenizer
        self.data_meta = data_meta
        self.keep_last = keep_last
        self.last_path: Path | None = None  # the newest good checkpoint (set to the resumed one on resume)
        self._guards: set[int] = set()  # steps saved only to guard an evaluation

    def on_fit_start(self, trainer: Trainer) -> None:
        remove_partial_files(self.run_dir)

    def on_save(self, trainer: Trainer, final: bool) -> None:
        path = checkpoint_path(self.run_dir, self.cfg.run.name, self.stage, None if final else trainer.step)
        save_checkpoint(path, {
            "stage": self.stage,
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.to_state(),
            "data": {"sources": self.data_meta["sources"], "tokens": self.data_meta["tokens"],
                     **({"fingerprint": self.data_meta["fingerprint"]} if "fingerprint" in self.data_meta else {})},
            **self.extra,
            **trainer.state_dict(),
        })
        self.last_path = path
        if getattr(trainer, "save_reason", "schedule") == "eval":
            self._guards.add(trainer.step)
        self.prune(trainer, final)

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.prune(trainer)  # this evaluation may have made another checkpoint the best

    def best_step(self, trainer: Trainer) -> int | None:
        return best_checkpoint_step(trainer.history, {s for s, _ in step_checkpoints(self.run_dir, self.stage)})

    def prune(self, trainer: Trainer, final: bool = False) -> None:
        """Drop eval-guard checkpoints once scored (unless best, or made redundant by the final
        one), then apply keep_last, never touching the best one or a guard awaiting its eval."""
        best = self.best_step(trainer)
        scored = {h["step"] for h in trainer.history}
        for step in sorted(self._guards):
            if (final and step == trainer.step) or (step in scored and step != best):
                with contextlib.suppress(OSError):
                    checkpoint_path(self.run_dir, self.cfg.run.name, self.stage, step).unlink()
                self._guards.discard(step)
        if self.keep_last > 0:
            best = self.best_step(trainer)
            prune_step_checkpoints(self.run_dir, self.stage, self.keep_last, {best} if best is not None else set(),
                                   ignore=self._guards)
