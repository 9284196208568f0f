"""What a run directory says about its run: the status record and the summary `llmctl runs` shows.

A run directory holds `config.toml`, `training.log`, `metrics.jsonl`, checkpoints and
`status.json`. The status record is written atomically (temp file, rename) when training
starts (`running`, with the process id, host and process start time), when it ends
(`finished`) and when it stops early (`interrupted` by a signal, `failed` on NaN or an
error). A process killed outright (`kill -9`, the OOM killer, a closed laptop lid) cannot
write anything, so a `running` record whose process is gone reads as `interrupted`:
checking the process id alone would be fooled by a recycled id, so its start time is
compared too (Linux `/proc`; elsewhere the id alone).

Runs written before status records existed are read from what they left: a final
checkpoint means finished; the last line of training.log tells a signal stop from a
divergence; a log touched in the last few minutes means running.

Everything else — steps, tokens, validation perplexity, wall time — comes from
metrics.jsonl, which already survives resumes without duplicates (see `llmctl.progress`).
This module imports neither torch nor the checkpoint code, so `llmctl runs` is instant; the
checkpoint file name pattern is repeated here for that reason (`checkpoint.checkpoint_path`).
A run's `.lock` (its writer's lock, see `llmctl.runlock`) matches none of these files and is ignored.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import socket
import time
import tomllib
from pathlib import Path
from typing import Any

from llmctl.atomic import write_text_atomic
from llmctl.errors import ConfigError

STATUS_FILE = "status.json"
TASKS_FILE = "eval_tasks.json"  # `llmctl eval --tasks` scores, written by llmctl.lm_eval_adapter
STATES = ("running", "finished", "interrupted", "failed")
RECENT_SECONDS = 300  # a status-less run whose log changed this recently is taken as running
_CHECKPOINT = re.compile(r"-(?P<stage>[a-z]+)_(?:step(?P<step>\d+)|final)\.pt$")


# --------------------------------------------------------------------------- the status record

def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a recycled pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid())}


def process_alive(status: dict[str, Any]) -> bool | None:
    """Whether the process that wrote a `running` record still runs; None = cannot tell (other host)."""
    pid = status.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    if status.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return None
    started = status.get("process_start")
    if isinstance(started, int):
        now = _process_start(pid)
        if now is not None and now != started:
            return False  # the id was recycled by another process
    return True


def write_status(run_dir: Path, record: dict[str, Any]) -> None:
    """Replace status.json in one step (a reader never sees half a record)."""
    write_text_atomic(run_dir / STATUS_FILE, json.dumps(record, indent=1))


def read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in STATES else None


# --------------------------------------------------------------------------- reading a run

def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) from metrics.jsonl, in order; damaged lines are skipped."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return train, evals
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            (evals if record.get("type") == "eval" else train).append(record)
    return train, evals


def checkpoints(run_dir: Path) -> list[tuple[str, int | None, Path]]:
    """(stage, step or None for final, path) of the llmctl checkpoints in a run directory."""
    found = []
    for p in run_dir.glob("*.pt"):
        m = _CHECKPOINT.search(p.name)
        if m and not p.name.startswith("."):
            found.append((m["stage"], int(m["step"]) if m["step"] else None, p))
    return found


def _newest_checkpoint(found: list[tuple[str, int | None, Path]]) -> Path | None:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    return max((p for _, _, p in found), key=mtime, default=None)


def wall_seconds(train: list[dict[str, Any]], evals: list[dict[str, Any]] = ()) -> float | None:
    """Training wall time over all attempts: `elapsed_seconds` restarts at 0 on each resume,
    so the run's total is the sum of each attempt's last value, plus the evaluation that
    follows the last logged step (it runs after that record was written)."""
    total, last, seen = 0.0, 0.0, False
    for r in train:
        elapsed = r.get("elapsed_seconds")
        if not isinstance(elapsed, (int, float)):
            continue
        if elapsed < last:  # a new attempt began
            total += last
        last, seen = float(elapsed), True
    if not seen:
        return None
    final_step = train[-1]["step"]
    tail = sum(e.get("eval_seconds", 0.0) for e in evals
               if e["step"] == final_step and isinstance(e.get("eval_seconds"), (int, float)))
    return total + last + tail


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        with open(run_dir / "config.toml", "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _last_log_line(run_dir: Path) -> str:
    try:
        with open(run_dir / "training.log", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
    except OSError:
        return ""


def _derived_state(run_dir: Path, found: list[tuple[str, int | None, Path]]) -> tuple[str, str]:
    """State and reason of a run without a status record (written before llmctl kept one)."""
    last = _last_log_line(run_dir)
    log = run_dir / "training.log"
    recent = log.is_file() and time.time() - log.stat().st_mtime < RECENT_SECONDS
    if "stopped by SIG" in last:
        return "interrupted", last.split(" ", 2)[-1]
    if "diverged" in last or "non-finite" in last:
        return "failed", last.split(" ", 2)[-1]
    if any(step is None for _, step, _ in found):
        return "finished", ""
    if recent:
        return "running", ""
    return "interrupted", "no status record and no final checkpoint"


def _bits_per_byte(record: dict[str, Any], key: str = "val_bits_per_byte") -> float | None:
    value = record.get(key, record.get("bits_per_byte") if key == "val_bits_per_byte" else None)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _number(record: dict[str, Any] | None, key: str) -> float | None:
    value = (record or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def read_task_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Each task's latest `llmctl eval --tasks` scores saved in a run directory ({} when none)."""
    try:
        data = json.loads((Path(run_dir) / TASKS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    tasks = data.get("tasks") if isinstance(data, dict) else None
    return {k: v for k, v in tasks.items() if isinstance(v, dict)} if isinstance(tasks, dict) else {}


def task_headline(row: dict[str, Any]) -> tuple[str, float] | None:
    """The one number shown for a task: acc_norm, else acc, else its first metric."""
    metrics = row.get("metrics")
    if not isinstance(metrics, dict):
        return None
    for name in ("acc_norm", "acc", *metrics):
        value = metrics.get(name, {}).get("value") if isinstance(metrics.get(name), dict) else None
        if isinstance(value, (int, float)):
            return name, float(value)
    return None


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """One row of `llmctl runs`: plain values (None where the run does not say), JSON-ready."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    found = checkpoints(run_dir)
    train, evals = read_metrics(run_dir)
    config = _read_config(run_dir)

    stage = (status or {}).get("stage")
    newest = _newest_checkpoint(found)
    if not stage and newest is not None:
        stage = _CHECKPOINT.search(newest.name)["stage"]
    if not stage:
        stage = "pretrain" if "pretrain" in config else None

    if status is not None:
        state, reason = status["state"], status.get("reason") or ""
        if state == "running" and process_alive(status) is False:
            state, reason = "interrupted", "the process ended without a final record (killed?)"
    else:
        state, reason = _derived_state(run_dir, found)

    step = max([r["step"] for r in train] + [(status or {}).get("step") or 0], default=0)
    max_steps = (status or {}).get("max_steps") or (train[-1].get("max_steps") if train else None)
    if not max_steps and stage:
        max_steps = config.get(stage, {}).get("max_steps")
    tokens = max([r.get("tokens", 0) for r in train] + [(status or {}).get("tokens") or 0], default=0)
    scored = [e for e in evals if isinstance(e.get("val_perplexity"), (int, float))
              and math.isfinite(e["val_perplexity"])]
    best = min(scored, key=lambda e: e["val_loss"], default=None)
    last = evals[-1] if evals else None
    bpb = [b for b in (_bits_per_byte(e) for e in evals) if b is not None]
    started = (status or {}).get("started_at")
    if not started and (run_dir / "config.toml").is_file():
        started = datetime.datetime.fromtimestamp((run_dir / "config.toml").stat().st_mtime).astimezone() \
            .isoformat(timespec="seconds")
    return {
        "name": run_dir.name, "path": str(run_dir), "stage": stage, "state": state, "reason": reason,
        "step": step, "max_steps": max_steps, "tokens": tokens,
        "val_perplexity": last.get("val_perplexity") if last else None,
        "best_val_perplexity": best["val_perplexity"] if best else None,
        "best_step": best["step"] if best else None,
        "val_bits_per_byte": _bits_per_byte(last) if last else None,
        "best_val_bits_per_byte": min(bpb) if bpb else None,
        # The network mixed with counted n-grams, where the run's config mixes them in.
        "val_mixture_perplexity": _number(last, "val_mixture_perplexity"),
        "val_mixture_bits_per_byte": _bits_per_byte(last, "val_mixture_bits_per_byte") if last else None,
        "wall_seconds": wall_seconds(train, evals), "checkpoint": str(newest) if newest else None,
        "started_at": started,
        # `llmctl eval --tasks`: {task: {"metric": acc_norm / acc / ..., "value": score}}
        "tasks": {task: {"metric": h[0], "value": h[1]} for task, row in read_task_results(run_dir).items()
                  if (h := task_headline(row)) is not None},
    }


def training_in_progress(run_dir: Path) -> str | None:
    """Why a run directory holds no checkpoint yet when it is being trained right now (its
    status says running and its process lives, or runs on another host where that cannot be
    checked): where it is and when its first checkpoint comes. None otherwise."""
    status = read_status(run_dir)
    if status is None or status["state"] != "running":
        return None
    alive = process_alive(status)
    if alive is False:
        return None  # killed before its first save: nothing will come
    row = summarize_run(run_dir)
    step, max_steps = row["step"], row["max_steps"]
    section = _read_config(run_dir).get(row["stage"] or "pretrain", {})
    # The trainer saves every save_every steps, before every evaluation, and at max_steps.
    due = [max_steps] if isinstance(max_steps, int) else []
    due += [(step // every + 1) * every for every in (section.get("save_every"), section.get("eval_every"))
            if isinstance(every, int) and every > 0]
    pid = status.get("pid", "?")
    where = f"pid {pid}" if alive else f"pid {pid} on host {status.get('host', '?')}"
    progress = f"step {step:,} of {max_steps:,}" if isinstance(max_steps, int) else f"step {step:,}"
    first = f"its first save at step {min(due):,}" if due else "its first save"
    stop = f"Ctrl-C where it runs, or kill {pid}" if alive else "Ctrl-C where it runs"
    return (f"it is still training ({progress}, {where}); wait for {first}, or stop it ({stop}), "
            f"which saves the step it is at")


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in (STATUS_FILE, "metrics.jsonl", "config.toml"))


def list_runs(root: str | Path = "experiments/runs") -> list[dict[str, Any]]:
    """Every run under `root` (or `root` itself when it is a run directory), oldest first."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"{root} {what}; pass the folder that holds your runs (run.output_dir, "
                          f"default experiments/runs)")
    dirs = [root] if is_run_dir(root) else sorted(p for p in root.iterdir() if is_run_dir(p))
    rows = [summarize_run(d) for d in dirs]
    return sorted(rows, key=lambda r: (r["started_at"] or "", r["name"]))


# --------------------------------------------------------------------------- showing it

def compact(n: float | int | None) -> str:
    """12,345,678 -> 12.3M: token counts span six orders of magnitude."""
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:,.0f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(datetime.timedelta(seconds=int(seconds)))


STATE_STYLE = {"running": "cyan", "finished": "green", "interrupted": "yellow", "failed": "red"}


def runs_table(rows: list[dict[str, Any]], title: str):
    """A Rich table of run summaries; the bits-per-byte columns only when some run recorded them."""
    from rich.markup import escape
    from rich.table import Table

    with_bpb = any(r["val_bits_per_byte"] is not None for r in rows)
    with_mixture = any(r.get("val_mixture_perplexity") is not None for r in rows)
    table = Table(title=title)
    columns = ["run", "stage", "steps", "tokens", "val ppl", "best ppl"]
    columns += ["bits/byte", "best b/B"] if with_bpb else []
    columns += ["+counts ppl"] + (["+counts b/B"] if with_bpb else []) if with_mixture else []
    with_tasks = any(r.get("tasks") for r in rows)
    columns += ["tasks"] if with_tasks else []
    columns += ["wall", "state", "newest checkpoint"]
    for c in columns:
        table.add_column(c, justify="left" if c in ("run", "stage", "tasks", "state", "newest checkpoint") else "right")

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        steps = f"{r['step']:,}/{r['max_steps']:,}" if r["max_steps"] else f"{r['step']:,}"
        best = num(r["best_val_perplexity"], ".2f") + (f" @{r['best_step']}" if r["best_step"] is not None else "")
        cells = [escape(r["name"]), r["stage"] or "-", steps, compact(r["tokens"]), num(r["val_perplexity"], ".2f"), best]
        if with_bpb:
            cells += [num(r["val_bits_per_byte"], ".4f"), num(r["best_val_bits_per_byte"], ".4f")]
        if with_mixture:
            cells += [num(r.get("val_mixture_perplexity"), ".2f")]
            cells += [num(r.get("val_mixture_bits_per_byte"), ".4f")] if with_bpb else []
        if with_tasks:
            cells += [escape(", ".join(f"{t} {v['value']:.3f}" for t, v in sorted((r.get("tasks") or {}).items()))
                             or "-")]
        state = f"[{STATE_STYLE[r['state']]}]{r['state']}[/]"
        cells += [duration(r["wall_seconds"]), state, escape(Path(r["checkpoint"]).name) if r["checkpoint"] else "-"]
        table.add_row(*cells)
    return table
