"""Two processes, one run folder: a live run refuses every second writer, a dead one is taken
over, `--resume auto` starts or continues, and a failed start leaves no folder.

Real `python -m llmctl` subprocesses on the 1-layer, 32-wide model of small_runs.py. The live
holder trains for 100,000 steps (saving every 2) and is killed in a finally.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from small_runs import small_run_args

LIVE = "live"
CHAT = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                          {"role": "assistant", "content": f"{i}."}]}) for i in range(25))


def environment(cache: Path) -> dict[str, str]:
    env = dict(os.environ, LLMCTL_CACHE=str(cache))
    env.pop("LLMCTL_DEBUG", None)
    env.pop("RANK", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's llmctl
    return env


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "llmctl", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def llmctl(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    return finish(start(args, cwd, env))


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the holder exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*-pretrain_step*.pt"), key=lambda p: int(p.stem.rsplit("step", 1)[1]))


def lock_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / ".lock").read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runlock")


@pytest.fixture(scope="module")
def env(folder) -> dict[str, str]:
    return environment(folder / "cache")


@pytest.fixture(scope="module")
def live_args(shakespeare, small_tok) -> list[str]:
    return small_run_args(LIVE, shakespeare, small_tok, "--set", "pretrain.max_steps=100000",
                          "--set", "pretrain.save_every=2", "--set", "pretrain.keep_last=2")


@pytest.fixture(scope="module")
def live(folder, env, live_args):
    """A pretrain run that is training (it has saved a checkpoint and written its lock record)."""
    proc = start(live_args, folder, env)
    run_dir = folder / "experiments" / "runs" / LIVE
    try:
        wait_for(lambda: checkpoints(run_dir), "its first checkpoint", proc)  # the lock came before it
        yield proc, run_dir
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def copy_checkpoint(run_dir: Path, to: Path) -> Path:
    """A step checkpoint of the live run, copied out (retention may delete one mid-copy)."""
    for _ in range(50):
        try:
            shutil.copyfile(checkpoints(run_dir)[-1], to)
            return to
        except (FileNotFoundError, IndexError):
            time.sleep(0.05)
    raise AssertionError("could not copy a checkpoint of the live run")


def test_a_live_run_refuses_every_second_writer(live, folder, env, live_args):
    proc, run_dir = live
    holder = lock_record(run_dir)
    assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname() and holder["command"] == "pretrain"
    config = (run_dir / "config.toml").read_bytes()
    base = copy_checkpoint(run_dir, folder / "base.pt")
    (folder / "chat.jsonl").write_text(CHAT)
    sft = ["sft", "--from", str(base), "--preset", "tiny", "--run-name", LIVE,
           "--set", f'sft.datasets=["jsonl:{folder / "chat.jsonl"}"]', "--set", "run.device=cpu"]
    attempts = {"fresh": live_args, "overwrite": [*live_args, "--overwrite"], "resume": [*live_args, "--resume"],
                "resume auto": [*live_args, "--resume", "auto"], "sft": sft}
    running = {name: start(args, folder, env) for name, args in attempts.items()}  # all at once: 2 cores, not 5
    results = {name: finish(p) for name, p in running.items()}

    who = f"(pid {proc.pid} on host {socket.gethostname()}, started "
    for name, (code, out, err) in results.items():
        assert code == 1 and out == "", f"{name}: exit {code}\n{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err}"
        assert lines[0].startswith(f"error: {Path('experiments/runs') / LIVE} is in use by llmctl pretrain {who}"), \
            f"{name}: {lines[0]}"
        assert lines[0].endswith("wait for it to finish or stop it, or choose another --run-name"), lines[0]

    assert proc.poll() is None, "the live run stopped"
    assert (run_dir / "config.toml").read_bytes() == config
    assert checkpoints(run_dir), "--overwrite deleted the live run's checkpoints"
    log = (run_dir / "training.log").read_text()
    assert log.count(f"run {LIVE}:") == 1 and "sft" not in log and "resumed" not in log  # one writer's lines
    assert lock_record(run_dir)["pid"] == proc.pid and lock_record(run_dir)["command"] == "pretrain"


def test_resume_takes_over_the_lock_of_a_killed_run(live, folder, env, live_args):
    proc, run_dir = live
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert lock_record(run_dir)["pid"] == proc.pid  # the record outlives its process; the flock does not
    step = int(checkpoints(run_dir)[-1].stem.rsplit("step", 1)[1])
    code, out, err = llmctl([*live_args, "--set", f"pretrain.max_steps={step + 2}", "--resume"], folder, env)
    assert code == 0, err
    assert out.strip() == str(Path("experiments/runs") / LIVE / f"{LIVE}-pretrain_final.pt")
    took = (f"took over the run lock of llmctl pretrain (pid {proc.pid} on host {socket.gethostname()}, started ")
    assert took in err and "which is no longer running" in err
    assert f"resumed from {LIVE}-pretrain_step{step}.pt at step {step}" in err
    assert took in (run_dir / "training.log").read_text()
    assert (run_dir / ".lock").read_text() == ""  # released: no holder named


def test_reading_a_run_before_its_first_checkpoint_says_it_is_still_training(folder, env, shakespeare, small_tok):
    """eval and sft --from on a run that is training but has not saved yet name its step, its pid
    and when its first checkpoint comes; once the process is gone, they do not. (generate and
    export find their checkpoint as eval does, through `resolve_checkpoint`.)"""
    from llmctl.runs import read_metrics, read_status

    args = small_run_args("early", shakespeare, small_tok, "--set", "pretrain.max_steps=100000",
                          "--set", "pretrain.save_every=30000", "--set", "pretrain.eval_every=50000")
    run_dir = folder / "experiments" / "runs" / "early"
    proc = start(args, folder, env)
    readers = [["eval", "-c", str(run_dir)],
               ["sft", "--from", str(run_dir), "--preset", "tiny", "--set", "run.device=cpu"]]
    try:
        wait_for(lambda: (read_status(run_dir) or {}).get("state") == "running" and len(read_metrics(run_dir)[0]) >= 3,
                 "its first logged steps", proc)
        for command in readers:
            code, out, err = llmctl(command, folder, env)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1, err
            assert lines[0].startswith(f"error: {run_dir} holds no checkpoint yet: it is still training (step "), err
            assert f" of 100,000, pid {proc.pid}); wait for its first save at step 30,000" in lines[0], err
            assert f"or stop it (Ctrl-C where it runs, or kill {proc.pid})" in lines[0], err
        assert not list(run_dir.glob("*.pt"))
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    # Killed before any save: status.json still says running, but its process is gone.
    code, _, err = llmctl(readers[0], folder, env)
    assert code == 2 and "holds no llmctl checkpoint" in err and "still training" not in err, err


def test_resume_auto_starts_fresh_then_continues(folder, env, shakespeare, small_tok):
    from llmctl.runs import list_runs

    def auto(steps: int) -> tuple[int, str, str]:
        return llmctl(small_run_args("elastic", shakespeare, small_tok, "--set", f"pretrain.max_steps={steps}",
                                     "--resume", "auto"), folder, env)

    code, out, err = auto(4)
    assert code == 0, err
    assert "resumed" not in err and "took over" not in err
    code, out, err = auto(8)
    assert code == 0, err
    assert "resumed from elastic-pretrain_final.pt at step 4" in err
    run_dir = folder / "experiments" / "runs" / "elastic"
    assert out.strip() == str(Path("experiments/runs/elastic/elastic-pretrain_final.pt"))
    assert (run_dir / ".lock").read_text() == ""
    row, = [r for r in list_runs(folder / "experiments" / "runs") if r["name"] == "elastic"]
    assert row["state"] == "finished" and row["step"] == 8  # the lock file confuses no listing


def test_a_start_that_fails_on_bad_input_leaves_no_run_folder(tmp_path, small_tok):
    env = environment(tmp_path / "cache")
    missing = tmp_path / "no-such-book.txt"
    # One after the other: two starts at once would each see the output folders the other made
    # and, rightly, leave them to their maker.
    for name, resume in (("fresh", []), ("auto", ["--resume", "auto"])):
        code, out, err = finish(start(small_run_args(name, missing, small_tok, *resume), tmp_path, env))
        assert code != 0 and out == "" and "Traceback" not in err, f"{name}: {err}"
        assert len(err.strip().splitlines()) == 1 and str(missing) in err, f"{name}: {err}"
        assert not (tmp_path / "experiments" / "runs" / name).exists(), f"{name} left its run folder"
    assert not (tmp_path / "experiments").exists()  # nor the output folders the lock created


# --------------------------------------------------------------------------- in-process

def test_resume_auto_and_overwrite_contradict(tmp_path):
    from llmctl.resume import check_run_dir
    from llmctl.errors import ConfigError, LlmctlError

    with pytest.raises(ConfigError, match="^--resume auto and --overwrite contradict each other"):
        check_run_dir(tmp_path, resume="auto", overwrite=True, stage="pretrain")
    assert check_run_dir(tmp_path, resume="auto", overwrite=False, stage="pretrain") is False
    (tmp_path / "r-sft_step2.pt").write_bytes(b"")  # another stage's checkpoint: a fresh start's refusal
    with pytest.raises(LlmctlError, match="already holds 1 checkpoint; pass --resume"):
        check_run_dir(tmp_path, resume="auto", overwrite=False, stage="pretrain")
    (tmp_path / "r-pretrain_step2.pt").write_bytes(b"")
    assert check_run_dir(tmp_path, resume="auto", overwrite=False, stage="pretrain") is True


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    from llmctl.runlock import hold_run_lock, judge_record
    from llmctl.runs import process_alive, this_process

    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    me = {**this_process(), "command": "pretrain"}
    gone = {**me, "pid": dead.pid, "process_start": None}
    elsewhere = {**me, "host": socket.gethostname() + "-elsewhere"}
    assert judge_record(None, None) == "free"
    assert judge_record(me, process_alive(me)) == "alive"
    assert judge_record(gone, process_alive(gone)) == "dead"
    assert judge_record(elsewhere, process_alive(elsewhere)) == "unknown"

    # Under torchrun only rank 0 locks: another rank neither creates the folder nor a lock file.
    monkeypatch.setenv("RANK", "1")
    with hold_run_lock(tmp_path / "run", "pretrain") as lock:
        assert lock.fd is None
    assert not (tmp_path / "run").exists()
