"""Resuming a run: whether a run directory may be started or resumed, which checkpoint a
resume continues from, and whether this run's config and data still match it.

`--resume` picks the newest loadable checkpoint of a stage by step (a final checkpoint counts
at its step; a newer file that cannot be loaded is skipped with a note), and refuses a config
that differs from the checkpoint's except in keys that are safe to change (`RESUME_SAFE`,
`RESUME_SAFE_TRAINING`): where and how fast to run, how long, how often to log, evaluate and
save, and the two knobs a diverged run needs (lr, grad_clip). The data position only means
something on the same token stream, so changed training data is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.checkpoint import all_checkpoints, load_checkpoint, step_checkpoints
from llmctl.config import Config, parse_duration
from llmctl.data.tokenizer import TextTokenizer
from llmctl.errors import ConfigError, LlmctlError

RESUME_AUTO = "auto"  # `--resume auto`: resume when the run has a checkpoint of its stage, else start fresh
RESUME_KEYS = ("model", "optimizer", "step", "tokens_seen", "data_position", "rng", "config")


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
        raise ConfigError(f"nothing to resume: {where}; check --run-name (and run.output_dir), "
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
    raise ConfigError(f"nothing to resume: {run_dir} holds no {stage} checkpoint; drop --resume "
                      f"to start a new run")


def require_keys(payload: dict[str, Any], path: Path) -> None:
    """A checkpoint to resume from must hold the whole training state, not just weights."""
    missing = [k for k in RESUME_KEYS if k not in payload]
    if missing:
        raise LlmctlError(f"{path} cannot be resumed from: it lacks {', '.join(missing)} "
                          f"(a weights-only or damaged checkpoint)")


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
    `llmctl.sft.examples_fingerprint`) must match the checkpoint's. A checkpoint saved
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
