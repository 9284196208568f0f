"""Ctrl-C and SIGTERM during `llmctl pretrain`: acknowledged at once, a checkpoint of the
current step, the command to resume, exit code 130 / 143; a second Ctrl-C exits at once and
leaves no partial file.

Real subprocesses on Tiny Shakespeare with the GPT-2 tokenizer, signalled once training has
visibly started; then the printed resume command is run and must continue exactly. The
acknowledgement must not wait for the main thread, which may be inside one long native call
(a backward pass): that part is checked on such a call directly.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import PYTHON
from llmctl.checkpoint import load_checkpoint
from llmctl.cli import app
from llmctl.runtime import StopSignals


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def pretrain_args(shakespeare: Path, gpt2_dir: Path, *extra: str) -> list[str]:
    # 2 x 32 tokens a step: the GPT-2 output layer (50,257 x 32) dominates; ~50 ms a step
    sets = [f'data.datasets=["text:{shakespeare}:400"]', f"data.tokenizer={gpt2_dir}", "model.d_model=32",
            "model.n_layers=1", "model.max_seq_len=32", "pretrain.batch_size=2", "pretrain.micro_batch_size=2",
            "run.device=cpu", "run.log_every=1", "eval.max_tokens=256",
            "pretrain.max_steps=100000", "pretrain.save_every=100000", "pretrain.eval_every=100000"]
    return ["pretrain", "--preset", "tiny", "--run-name", "sig", *[a for s in sets for a in ("--set", s)], *extra]


class Training:
    """`llmctl pretrain` in a subprocess, read line by line until training has started."""

    def __init__(self, cwd: Path, cache: Path, args: list[str]):
        env = dict(os.environ, LLMCTL_CACHE=str(cache), OMP_NUM_THREADS="1")
        env.pop("LLMCTL_DEBUG", None)
        self.proc = subprocess.Popen([PYTHON, "-m", "llmctl", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.watchdog = threading.Timer(120, self.proc.kill)  # never hang the suite
        self.watchdog.start()
        self.lines: list[str] = []

    def wait_for_step(self, step: int) -> None:
        prefix = f"step {step}/"
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith(prefix):
                return
        raise AssertionError("training never started:\n" + "".join(self.lines))

    def finish(self) -> tuple[int, str]:
        out, err = self.proc.communicate()
        self.watchdog.cancel()
        return self.proc.returncode, "".join(self.lines) + err


def resume_hint(stderr: str) -> list[str]:
    line = stderr.strip().splitlines()[-1]
    assert "resume with: " in line, stderr
    return shlex.split(line.split("resume with: ", 1)[1])


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_the_current_step_and_prints_how_to_resume(sig, code, tmp_path, cache, shakespeare,
                                                                gpt2_dir, monkeypatch):
    run = Training(tmp_path, cache, pretrain_args(shakespeare, gpt2_dir))
    run.wait_for_step(1)
    run.proc.send_signal(sig)
    returncode, stderr = run.finish()
    assert returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {sig.name} at step ") and "Traceback" not in stderr
    step = int(last.split(" at step ")[1].split(";")[0])
    assert step >= 1
    # piped: the acknowledgement is one plain line, printed before the stop, naming the step it stops at
    again = "Ctrl-C again to quit now" if sig == signal.SIGINT else "a second signal quits now"
    notices = [line for line in stderr.splitlines() if line.startswith(f"{sig.name}: ")]
    assert notices in ([f"{sig.name}: finishing step {step}, then saving — {again}"],
                       [f"{sig.name}: stopping at step {step}, then saving — {again}"]), stderr
    run_dir = tmp_path / "experiments" / "runs" / "sig"
    saved = run_dir / f"sig-pretrain_step{step}.pt"
    assert f"saved {saved.relative_to(tmp_path)}" in last
    assert load_checkpoint(saved)["step"] == step
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert f"stopped by {sig.name}" in (run_dir / "training.log").read_text()
    assert notices[0] in (run_dir / "training.log").read_text()
    if sig != signal.SIGINT:
        return

    # The printed command continues the run exactly: equal to a run that was never stopped.
    hint = resume_hint(stderr)
    assert hint[:2] == ["llmctl", "pretrain"] and hint[-1] == "--resume"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCTL_CACHE", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        more = ["--set", f"pretrain.max_steps={step + 2}"]
        resumed = CliRunner().invoke(app, hint[1:] + more)
        assert resumed.exit_code == 0, resumed.output
        straight = CliRunner().invoke(app, pretrain_args(shakespeare, gpt2_dir, "--run-name", "ref", *more))
        assert straight.exit_code == 0, straight.output
    finally:
        torch.set_num_threads(threads)
    a = load_checkpoint(run_dir / "sig-pretrain_final.pt")
    b = load_checkpoint(tmp_path / "experiments" / "runs" / "ref" / "ref-pretrain_final.pt")
    assert a["step"] == b["step"] == step + 2
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())


def test_second_ctrl_c_exits_at_once_without_a_partial_file(tmp_path, cache, shakespeare, gpt2_dir):
    # 16 x 64 tokens a step (about a second here): the second signal arrives while the first
    # one still waits for the step in flight to finish
    run = Training(tmp_path, cache, pretrain_args(shakespeare, gpt2_dir, *[a for s in (
        "model.max_seq_len=64", "pretrain.batch_size=16", "pretrain.micro_batch_size=8") for a in ("--set", s)]))
    run.wait_for_step(1)
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    run.proc.send_signal(signal.SIGINT)
    returncode, stderr = run.finish()
    assert returncode == 130, stderr
    assert "second SIGINT: stopped at once without saving" in stderr and "Traceback" not in stderr
    run_dir = tmp_path / "experiments" / "runs" / "sig"
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    for checkpoint in run_dir.glob("*.pt"):  # whatever was written is complete
        load_checkpoint(checkpoint)


# A loss whose backward pass is one native call of about SECONDS, calibrated on this machine
# (the backward of a warmed-up 20-layer chain, then as many layers as fill the time).
LONG_BACKWARD = """
import time, torch
torch.set_num_threads(1)
w = torch.randn(384, 384) / 384 ** 0.5
x = torch.randn(384, 384, requires_grad=True)
def chain(depth):
    y = x
    for _ in range(depth):
        y = torch.tanh(y @ w)
    return y.sum()
chain(20).backward()
sample = chain(20)
start = time.perf_counter()
sample.backward()
per_layer = (time.perf_counter() - start) / 20
loss = chain(max(20, int(SECONDS / per_layer)))
"""


def test_a_signal_is_acknowledged_at_once_while_the_main_thread_is_in_one_long_native_call():
    # Python runs its own handler only when the main thread is back between bytecodes: after
    # the whole backward pass. The acknowledgement must not wait for that.
    scope: dict = {}
    exec(LONG_BACKWARD.replace("SECONDS", "1.0"), scope)
    heard: dict[str, float] = {}

    def send() -> None:
        heard["sent"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    threads = torch.get_num_threads()
    try:
        with StopSignals(on_request=lambda signum: heard.setdefault("acknowledged", time.monotonic())) as stop:
            threading.Timer(0.2, send).start()
            scope["loss"].backward()
            returned = time.monotonic()
            assert stop.requested and stop.signum == signal.SIGINT
    finally:
        torch.set_num_threads(threads)
    assert returned - heard["sent"] > 0.3  # the main thread was busy long after the signal...
    assert heard["acknowledged"] - heard["sent"] < 0.1  # ...and the acknowledgement did not wait


def test_a_second_signal_quits_inside_one_long_native_call():
    script = LONG_BACKWARD.replace("SECONDS", "2.5") + (
        "import os, signal, threading\n"
        "from llmctl.runtime import StopSignals\n"
        "def twice():\n"
        "    print('sent', time.time(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05); os.kill(os.getpid(), signal.SIGINT)\n"
        "with StopSignals():\n"
        "    threading.Timer(0.2, twice).start()\n"
        "    loss.backward()\n"
        "    print('the backward pass returned', flush=True)\n"
    )
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    ended = time.time()
    assert result.returncode == 130, result.stderr
    assert "second SIGINT: stopped at once without saving" in result.stderr
    assert "returned" not in result.stdout  # it did not wait for the backward pass
    sent = float(result.stdout.split("sent ", 1)[1].split()[0])
    assert ended - sent < 1.0  # the backward pass had more than 2 s left


def test_forced_exit_deletes_the_file_being_written(tmp_path):
    """The second signal may land in the middle of a save: the temporary file must go."""
    script = (
        "import os, signal\n"
        "from llmctl.runtime import StopSignals, partial_file\n"
        f"path = {str(tmp_path / '.x.pt.abc.tmp')!r}\n"
        "with StopSignals(), partial_file(path):\n"
        "    open(path, 'wb').write(b'half a checkpoint')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('not reached')\n"
    )
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 143 and "not reached" not in result.stdout
    assert "second SIGTERM" in result.stderr
    assert list(tmp_path.iterdir()) == []
