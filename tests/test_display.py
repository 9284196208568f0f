"""What a person sees while training: phases before the first step, a bar that follows every
optimizer step with an ETA from the first one on, and a stop signal acknowledged at once.

Terminal output is read the way a terminal gets it: a Rich console that records every frame
(`Console(record=True, force_terminal=True)`), or a real `llmctl pretrain` on a pseudo-terminal.
Piped output must stay plain lines.
"""

from __future__ import annotations

import io
import os
import pty
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from conftest import PYTHON
from llmctl.cli import app
from llmctl.config import ModelConfig, TrainConfig
from llmctl.model import Transformer
from llmctl.phases import Phases
from llmctl.progress import ProgressCallback, RunLog, stop_notice
from llmctl.steptime import StepClock
from llmctl.trainer import Callback, Trainer
from small_runs import small_run_args

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SPINNER = set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # Rich's default "dots" frames


def recording_terminal() -> Console:
    return Console(record=True, force_terminal=True, width=200, file=io.StringIO())


# --------------------------------------------------------------------------- the parts


def test_step_rate_leaves_out_the_first_step_once_a_second_exists():
    clock = StepClock(start_step=0, started=100.0)
    assert clock.eta(10) is None  # nothing known before a step completes
    clock.tick(1, 130.0)  # the first step compiled: 30 s
    assert clock.eta(9) == pytest.approx(9 * 30.0)  # one step known: it is all there is
    clock.tick(2, 131.0)
    clock.tick(3, 132.0)
    assert clock.seconds_per_step() == pytest.approx(1.0)  # not (132 - 100) / 3
    assert clock.eta(7) == pytest.approx(7.0)
    resumed = StepClock(start_step=500, started=0.0)  # after a resume: steps of this fit only
    resumed.tick(501, 4.0)
    assert resumed.seconds_per_step() == pytest.approx(4.0)


def test_phases_spin_on_a_terminal_and_are_one_plain_line_each_otherwise():
    steps = ["loading the tokenizer gpt2 …", "tokenizing [wikitext] …", "building the model (30M parameters) …"]
    terminal = recording_terminal()
    with Phases(terminal) as phases:
        for step in steps:
            phases(step)
            time.sleep(0.25)  # the spinner redraws about 12 times a second
    drawn = terminal.export_text()
    for step in steps:
        assert any(f"{frame} {step}" in drawn for frame in SPINNER), drawn
    assert [drawn.index(step) for step in steps] == sorted(drawn.index(step) for step in steps)

    piped = Console(record=True, force_terminal=False, width=40)  # narrower than the lines: no wrapping either
    with Phases(piped) as phases:
        for step in steps:
            phases(step)
    assert piped.export_text(styles=True) == "".join(f"{step}\n" for step in steps)
    assert [text for _, text in phases.history] == steps


class Logged(Callback):
    def __init__(self):
        self.steps = []

    def on_log(self, trainer, record):
        self.steps.append(record["step"])


def tiny_trainer(callbacks, **train) -> Trainer:
    """A model of milliseconds a step whose batches take 0.3 s to arrive: long enough for the
    live display's refresh thread (10 frames a second) to draw every step."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16))
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))

    class Batches:
        def next_batch(self):
            time.sleep(0.3)
            return data[:, :-1], data[:, 1:]

        def state_dict(self):
            return {}

    cfg = TrainConfig(**{"lr": 1e-3, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, **train})
    return Trainer(model, cfg, batches=Batches(), evaluate=None, device=torch.device("cpu"), dtype=torch.float32,
                   seq_len=16, log_every=100, callbacks=callbacks)


@pytest.mark.parametrize("max_time, where", [("", r"step (\d)/5"), ("1h", r"step (\d), 0:00:\d\d of 1:00:00")])
def test_the_bar_follows_every_optimizer_step_with_an_eta_from_the_first_on(tmp_path, max_time, where):
    console = recording_terminal()
    progress = ProgressCallback(console, RunLog(tmp_path / "training.log"), title="t pretrain")
    logged = Logged()
    trainer = tiny_trainer([progress, logged], max_steps=5, max_time=max_time)
    trainer.fit()
    assert logged.steps == [1, 5]  # log_every 100: the loss is read back at the first and last step only
    drawn = console.export_text()
    frames = re.findall(where + r" (.*?) eta (-:--:--|\d+:\d\d:\d\d)", drawn)
    shown = [int(step) for step, _, _ in frames]
    assert sorted(set(shown)) == [0, 1, 2, 3, 4, 5], drawn  # every step, not only the logged ones
    assert shown == sorted(shown)
    for step, stats, eta in frames:
        if step == "0":
            assert eta == "-:--:--" and stats == "first step …", (stats, eta)
        else:  # an estimate as soon as one step's time is known
            assert eta != "-:--:--" and stats.startswith("loss "), (step, stats, eta)
    assert "first step …" in (tmp_path / "training.log").read_text()


def test_the_stop_notice_says_what_happens_to_the_work_in_flight():
    trainer = tiny_trainer([], max_steps=5)
    trainer.step = 3
    trainer.in_flight = 4
    assert stop_notice(trainer, signal.SIGINT) == "SIGINT: finishing step 4, then saving — Ctrl-C again to quit now"
    trainer.in_flight = None  # between steps: logging, saving
    assert stop_notice(trainer, signal.SIGTERM) == ("SIGTERM: stopping at step 3, then saving — "
                                                    "a second signal quits now")
    trainer.evaluating = True  # saved before it began; abandoned at once
    assert stop_notice(trainer, signal.SIGINT) == ("SIGINT: abandoning the evaluation (step 3 is saved) — "
                                                   "Ctrl-C again to quit now")


# --------------------------------------------------------------------------- plain output of a real run


def test_piped_output_is_one_line_per_phase_and_training_log_has_them(tmp_path, shakespeare, small_tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, small_run_args("plain", shakespeare, small_tok, "--set", "pretrain.max_steps=3"))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "\x1b" not in result.stderr and not SPINNER & set(result.stderr)
    phases = [f"loading the tokenizer {small_tok} …", f"tokenizing text:{shakespeare}:300 …",
              "building the model (", "first step …"]
    at = [next(i for i, line in enumerate(lines) if line.startswith(phase)) for phase in phases]
    assert at == sorted(at) and at[-1] < lines.index(next(line for line in lines if line.startswith("step 1/3")))
    log = (tmp_path / "experiments/runs/plain/training.log").read_text()
    logged = [line.split(" ", 2)[2] for line in log.splitlines()]  # without the date and time
    for phase in phases:
        assert sum(line.startswith(phase) for line in logged) == 1, log


# --------------------------------------------------------------------------- a real run on a terminal


class TerminalRun:
    """`llmctl` in a subprocess whose output is a pseudo-terminal, read in the background with
    the time each piece arrived."""

    def __init__(self, cwd: Path, cache: Path, args: list[str]):
        master, slave = pty.openpty()
        env = dict(os.environ, LLMCTL_CACHE=str(cache), OMP_NUM_THREADS="1", COLUMNS="220", LINES="50",
                   TERM="xterm-256color")
        for name in ("LLMCTL_DEBUG", "NO_COLOR", "FORCE_COLOR", "TERM_PROGRAM"):
            env.pop(name, None)
        self.proc = subprocess.Popen([PYTHON, "-m", "llmctl", *args], cwd=cwd, env=env, stdin=slave,
                                     stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.master = master
        self.pieces: list[tuple[float, str]] = []
        self.watchdog = threading.Timer(240, self.proc.kill)  # never hang the suite
        self.watchdog.daemon = True
        self.watchdog.start()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            self.pieces.append((time.monotonic(), ANSI.sub("", data.decode("utf-8", errors="replace"))))

    def text(self, until: float = float("inf")) -> str:
        return "".join(piece for at, piece in list(self.pieces) if at <= until)

    def wait_for(self, pattern: str, timeout: float = 180) -> float:
        """When `pattern` (a regex) first appeared in the output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pieces, seen = list(self.pieces), ""
            for at, piece in pieces:
                seen += piece
                if re.search(pattern, seen):
                    return at
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"never saw {pattern!r}:\n{self.text()[-3000:]}")

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def __enter__(self) -> "TerminalRun":
        return self

    def __exit__(self, *exc: object) -> None:
        """Whatever the test found: no process, thread or descriptor left behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.watchdog.cancel()
        self.reader.join(timeout=5)
        os.close(self.master)


def test_ctrl_c_on_a_terminal_is_acknowledged_within_the_step_and_a_second_one_quits(tmp_path, shakespeare,
                                                                                    small_tok):
    # 32 x 128 tokens a step through a 4-layer, 256-wide model: about 2 s a step here, so a
    # notice that waited for the step (or the backward pass, one native call) would be late.
    with TerminalRun(tmp_path, tmp_path / "cache", small_run_args(
        "tty", shakespeare, small_tok, *[a for s in (
            "model.d_model=256", "model.n_layers=4", "model.max_seq_len=128", "pretrain.batch_size=32",
            "pretrain.micro_batch_size=16", "pretrain.max_steps=1000", "pretrain.save_every=1000",
            "pretrain.eval_every=1000", "run.log_every=1000") for a in ("--set", s)])) as run:
        first_step_done = run.wait_for(r"step 1/1000 ")
        before = run.text(first_step_done)
        spinner = f"[{''.join(SPINNER)}]"
        for phase in (r"loading the tokenizer \S+ …", r"tokenizing text:\S+ …",
                      r"building the model \(3\.\dM parameters\) …"):
            assert re.search(f"{spinner} {phase}", before), phase  # a spinner, before step 1
        assert re.search(f"{spinner} tty pretrain [^\r]* step 0/1000 first step … eta -:--:--", before)
        run.wait_for(r"step [12]/1000 [^\r\n]* eta \d+:\d\d:\d\d")  # an ETA after one step

        run.proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        noticed = run.wait_for(r"SIGINT: (finishing step (\d+), then saving|stopping at step \d+, then saving) — "
                               r"Ctrl-C again to quit now")
        assert noticed - sent < 0.5, f"the notice took {noticed - sent:.2f}s"
        in_flight = re.search(r"finishing step (\d+)", run.text())
        if in_flight:  # the step it names had not finished when the notice showed
            assert not re.search(rf"\bstep {in_flight.group(1)}/1000", run.text(noticed))
        assert "stopped by SIGINT" not in run.text(noticed)

        run.proc.send_signal(signal.SIGINT)
        quit_sent = time.monotonic()
        assert run.finish() == 130
        out = run.text()
        assert "second SIGINT: stopped at once without saving" in out and "Traceback" not in out
        assert "stopped by SIGINT at step" not in out  # it did not wait to save
        if in_flight:
            assert time.monotonic() - quit_sent < 2.0  # well within the step in flight
        run_dir = tmp_path / "experiments/runs/tty"
        assert not list(run_dir.glob("*.pt")) and not list(run_dir.glob(".*.tmp"))
        assert "SIGINT: " in (run_dir / "training.log").read_text()
