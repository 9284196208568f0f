"""How the process runs: device and dtype resolution, autocast, seeding, RNG state, stop signals.

`dtype = "auto"` picks bf16 autocast (fp32 master weights) where the hardware does bf16
natively — CUDA from Ampere on, and CPUs with AVX-512 BF16 / AMX — and fp32 elsewhere.
fp16 is only offered on CUDA, where a gradient scaler keeps it stable.

`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM (preemption) into a polite request that the
training loop honours between steps: a step in flight always completes, so the checkpoint
written afterwards is a consistent state. A second signal is the escape hatch: the process
deletes any file it is half-way through writing (`partial_file`) and exits at once.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llmctl.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device is '{name}' but no CUDA GPU is available; use run.device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"run.device is '{name}' but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"run.device is '{name}' but MPS is not available; use run.device=auto or cpu")
    return device


def configure_device(device: torch.device, processes_per_node: int = 1) -> None:
    """Per-device speed settings, applied once before training.

    CUDA: TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer; ~10 bits of
    mantissa, the standard trade for 2-8x matmul speed in training). CPU: one compute thread
    per core for this process's share of the cores — more threads than cores is 1.3-2.3x
    slower, and under torchrun several processes share one machine's cores."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu" and processes_per_node > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_per_node))


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu":
            return torch.bfloat16 if cpu_supports_bf16() else torch.float32
        return torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError(f"run.dtype float16 needs a CUDA GPU (device is {device.type}); use bfloat16 or float32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """run.compile: true and false mean what they say; "auto" compiles on CUDA only. On a CPU
    compiling pays at useful sizes but costs up to a minute of cold compilation per run, more
    than a short experiment gains (benchmarks/RESULTS.md), so a preset that trains long on a
    CPU (cpu-10m) turns it on itself. MPS and Windows compilers are too unreliable to default on."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_rng_stream(rank: int) -> None:
    """Give this rank its own stream of the global RNGs (dropout masks) from here on.

    Every rank holds the same stream before (same seed, same draws: model init must agree);
    rank 0 keeps it, so it draws what one process would, and rank r > 0 re-seeds from one
    number drawn from it mixed with r. Without this, N ranks would draw the same dropout
    masks and regularise like one."""
    if rank == 0:
        return
    drawn = int(torch.randint(0, 2**62, (1,)))
    seed_everything(int(np.random.SeedSequence([drawn, rank]).generate_state(1, np.uint64)[0]) % 2**63)


def rng_state() -> dict:
    """All global RNG states as plain lists and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- stop signals

_PARTIAL_FILES: set[str] = set()
# Held while the registry changes, and for good by a forced exit: a file is never registered
# (and so never begun) after the exit has deleted the registered ones. Re-entrant, because the
# main thread's signal handler may run while that thread is inside `partial_file`.
_PARTIAL_LOCK = threading.RLock()


@contextlib.contextmanager
def partial_file(path: str | os.PathLike) -> Iterator[None]:
    """Mark a temporary file being written, so a forced exit deletes it instead of leaving half a file."""
    key = os.fspath(path)
    with _PARTIAL_LOCK:
        _PARTIAL_FILES.add(key)
    try:
        yield
    finally:
        with _PARTIAL_LOCK:
            _PARTIAL_FILES.discard(key)


class StopRequested(BaseException):
    """Raised inside `StopSignals.interruptible()` when the first signal arrives.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """While active, SIGINT and SIGTERM ask the training loop to stop instead of killing it.

    The first signal sets `signum`; the loop polls `requested` after each step, saves and
    exits with 128 + signum. Inside `interruptible()` (an evaluation: long, and it changes no
    state) the first signal raises `StopRequested` at once instead. A second signal deletes
    the files registered with `partial_file`, prints one line and calls `os._exit(128 + signum)`
    without running any more Python code that could write. Handlers are installed only in
    the main thread (the only place Python delivers signals) and restored on exit.

    Python runs a handler only between bytecodes of the main thread, so while that thread is
    inside one long native call (a backward pass is one) the handler waits for it to return.
    `on_request(signum)` is therefore called from a watcher thread that the interpreter's
    C-level handler wakes at once (`signal.set_wakeup_fd`): it acknowledges the first signal
    the moment it arrives, and the watcher also carries out a second one while the main
    thread is still busy (unless a registered file is being written: the main thread's
    handler, which then runs between its writes, deletes it first).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_request: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_request = on_request
        self._previous: dict[int, object] = {}
        self._interruptible = False
        self._watcher: SignalWatcher | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._watcher = SignalWatcher.start(self.SIGNALS, self._acknowledge)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A region that the first signal may abandon at once (raises StopRequested)."""
        if self.signum is not None:
            raise StopRequested(self.signum)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def _acknowledge(self, signum: int, count: int) -> None:
        """The watcher thread's part: announce the first signal, carry out a second."""
        if count >= 2:
            force_exit(signum, wait_for_writes=True)
        elif self.on_request is not None:
            with contextlib.suppress(Exception):  # a display failing must not lose the stop itself
                self.on_request(signum)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            if self._watcher is None:  # no watcher (no wakeup fd here): announce from the handler
                self._acknowledge(signum, 1)
            if self._interruptible:
                self._interruptible = False
                raise StopRequested(signum)
            return
        force_exit(signum)


class SignalWatcher:
    """A daemon thread woken by the interpreter's C-level signal handler through a pipe
    (`signal.set_wakeup_fd`), so it sees a signal within milliseconds whatever the main thread
    is doing; it calls `react(signum, count)` for each of `signals` (count = how many so far)."""

    def __init__(self, signals: tuple[int, ...], react: Callable[[int, int], None]):
        self.signals = set(signals)
        self.react = react
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # the C handler must never block on a full pipe
        self.previous_fd = signal.set_wakeup_fd(self.write_fd)
        self.count = 0
        self.thread = threading.Thread(target=self._run, name="llmctl-signal-watcher", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, signals: tuple[int, ...], react: Callable[[int, int], None]) -> "SignalWatcher | None":
        """A running watcher, or None where a wakeup fd cannot be a pipe (Windows)."""
        try:
            return cls(signals, react)
        except (ValueError, OSError):
            return None

    def _run(self) -> None:
        while True:
            try:
                received = os.read(self.read_fd, 64)
            except OSError:
                return
            if not received:
                return
            for signum in received:
                if signum == 0:  # stop() wakes the thread with a zero byte
                    return
                if self.previous_fd >= 0:  # whoever had the wakeup fd before still hears of it
                    with contextlib.suppress(OSError):
                        os.write(self.previous_fd, bytes([signum]))
                if signum in self.signals:
                    self.count += 1
                    self.react(signum, self.count)

    def stop(self) -> None:
        signal.set_wakeup_fd(self.previous_fd)
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"\0")
        self.thread.join(timeout=5)
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def force_exit(signum: int, wait_for_writes: bool = False) -> None:
    """Delete half-written files and leave now: the second Ctrl-C must not wait for anything.

    From a thread other than the one writing (`wait_for_writes`), a registered file being
    written is first let finish (the main thread's handler, which runs between its writes, may
    delete it and exit sooner): deleting it under the writer could let the writer create it
    again before the exit. The lock is then kept, so no new file is begun."""
    _PARTIAL_LOCK.acquire()
    while wait_for_writes and _PARTIAL_FILES:
        _PARTIAL_LOCK.release()
        time.sleep(0.01)
        _PARTIAL_LOCK.acquire()
    for path in list(_PARTIAL_FILES):
        with contextlib.suppress(OSError):
            os.unlink(path)
    message = (f"\nsecond {signal_name(signum)}: stopped at once without saving; the newest complete "
               f"checkpoint is untouched (continue with --resume)\n")
    if os.isatty(2):
        message = "\x1b[?25h" + message  # a live display hides the cursor; give it back
    with contextlib.suppress(OSError):
        os.write(2, message.encode())
    os._exit(128 + signum)


# --------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a `torchrun` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # "ddp" (replicated weights) or "fsdp" (sharded, FSDP2 fully_shard)
    launched: bool = False  # started by torchrun: distributed even as a group of one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched


def init_distributed(device_name: str, strategy: str) -> tuple[DistInfo, torch.device]:
    """Join the process group that `torchrun` describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT); alone, return rank 0 of 1 and the configured device.
    `torchrun --nproc_per_node=1` is a group of one that takes the distributed code path
    (DDP or FSDP2 wrapping, collectives), so a multi-GPU setup can be checked on one device.

    Each rank takes GPU `LOCAL_RANK` on CUDA (NCCL); on CPU the ranks talk over gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        device = resolve_device(device_name)
        configure_device(device)
        return DistInfo(strategy=strategy), device
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "mps":
        raise ConfigError("distributed training on MPS is not supported by PyTorch; use run.device=cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                **_attempt_store(rank, world))
    info = DistInfo(rank, world, local_rank, strategy, launched=True)
    configure_device(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    import atexit

    atexit.register(shutdown_distributed, info)  # however the command ends
    return info, device


def _attempt_store(rank: int, world: int) -> dict:
    """torchrun's store for this restart attempt, as init_process_group arguments.

    torchrun (`--max-restarts`) keeps one key-value store for every attempt of a job, and the
    process group's keys (each rank's address) carry no attempt number: a restarted group can
    read the previous attempt's addresses and fail to connect. A prefix per attempt keeps
    them apart. Outside an agent-hosted store, the default rendezvous is right as it is."""
    import datetime

    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(minutes=10))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"llmctl/attempt-{attempt}", store), "rank": rank, "world_size": world}


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            # Ranks leave together: a rank that tears its group down while another is still
            # finishing (writing the last checkpoint or plot) can abort the other's exit.
            with contextlib.suppress(Exception):
                if dist.get_backend() == "gloo":
                    import datetime

                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
                else:
                    dist.barrier()
            dist.destroy_process_group()


def gather_to_all(value: object, info: DistInfo) -> list[object]:
    """Every rank's `value` (plain data and CPU tensors), in rank order, on every rank."""
    if not info.enabled:
        return [value]
    import torch.distributed as dist

    gathered: list[object] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_ranks_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small tensor over ranks (a no-op alone); gloo has no AVG, so callers divide."""
    if info.enabled:
        import torch.distributed as dist

        # NCCL reduces GPU tensors only; gloo works on CPU tensors.
        where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        reduced = values.detach().to(where, copy=True)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        values = reduced.to(values.device)
    return values


class RankAgreement:
    """A few host-side numbers (a stop request, rank 0's clock) summed over every rank without
    stalling the device or the step.

    The sum runs on CPU tensors over a gloo group of its own, in the background: `exchange()`
    returns the sum it launched at its previous call and launches the next, so every rank acts
    on the same numbers at the same step, one step after they were sent. Reading a flag that
    an all-reduce on the training device produced would be a host sync every step."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._group = dist.new_group(backend="gloo")  # a collective: every rank builds one
        self._pending: tuple[object, torch.Tensor] | None = None

    def exchange(self, values: list[float]) -> list[float] | None:
        """Launch the sum of `values`; return the previous call's sum (None on the first call)."""
        previous = self.settle()
        sent = torch.tensor(values, dtype=torch.float64)
        self._pending = (self._dist.all_reduce(sent, group=self._group, async_op=True), sent)
        return previous

    def now(self, values: list[float]) -> list[float]:
        """The sum of `values` over ranks, waited for (at the start and end of a run)."""
        self.settle()
        self.exchange(values)
        return self.settle()

    def settle(self) -> list[float] | None:
        """Wait for the sum in flight, if any, and return it."""
        if self._pending is None:
            return None
        work, sent = self._pending
        self._pending = None
        work.wait()
        return sent.tolist()
