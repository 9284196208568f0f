"""`llmctl serve`: one model behind an OpenAI-compatible HTTP API and a chat page.

The model is loaded once; requests from any number of clients go to one
`llmctl.batching.BatchGenerator`, which writes their replies together in batches. The web
side lives in `llmctl.serve_app` (routes) and `llmctl.serve_api` (request checks and
response shapes); this module is what the CLI calls: check the extra, bind the port, load,
serve until Ctrl-C.

The port is bound before the model is loaded, so a port in use fails in a second with one
line, not after the load. By default only this machine can connect (127.0.0.1); on another
address without an API key a warning says that anyone who reaches it can use the model.
fastapi and uvicorn are the optional `serve` extra: without them, one line names it.
"""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError

EXTRA_HINT = 'pip install "llmctl[serve]"'
GRACEFUL_S = 2  # on Ctrl-C, open streams get this long before they are cut


def require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError(f"llmctl serve needs the serve extra: {EXTRA_HINT}") from None


def check_options(port: int, max_batch: int, max_waiting: int, api_key: str | None) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a port; use 1-65535 (0 = any free port)")
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    if max_waiting < 1:
        raise ConfigError(f"--max-waiting must be >= 1, got {max_waiting}")
    if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key)):
        raise ConfigError("--api-key (or LLMCTL_API_KEY) must be non-empty and hold no spaces: clients send it "
                          "in an 'Authorization: Bearer KEY' header")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, not yet listening (uvicorn listens once the app is ready)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise ConfigError(f"--host {host}: no such address or host name; use 127.0.0.1 (this machine only) or "
                          f"0.0.0.0 (every interface)") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As every server does: a restart may take the port while the last run's connections linger
    # in TIME_WAIT. Linux still refuses a port that another process listens on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        where = f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is already in use on {host} (another llmctl serve?); pick another with "
                              f"--port N (--port 0 takes any free one), or stop the process holding it") from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"no permission to listen on {where}: ports below 1024 need root; use e.g. "
                              f"--port 8000") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {host} is not an address of this machine; use 127.0.0.1 (this machine "
                              f"only) or 0.0.0.0 (every interface)") from None
        raise ConfigError(f"cannot listen on {where}: {e.strerror}") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_everywhere(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "[::]")


def urls(host: str, port: int) -> list[str]:
    """How to reach the server: this machine first, then (bound everywhere) this machine's name."""
    def url(name: str) -> str:
        return f"http://[{name}]:{port}/" if ":" in name else f"http://{name}:{port}/"

    if not is_everywhere(host):
        return [url(host)]
    out = [url("::1" if host in ("::", "[::]") else "127.0.0.1")]
    name = socket.gethostname()
    if name and name != "localhost":
        out.append(url(name))
    return out


def model_name(loaded: Any) -> str:
    """The model id clients send: the run's name, else the checkpoint's (or folder's, or Hub id's) name."""
    config = loaded.config
    if config is not None and config.run.name:
        return config.run.name
    if loaded.path is not None:
        return Path(loaded.path).stem
    source = str(loaded.source).rstrip("/")
    return Path(source).name if Path(source).expanduser().exists() else source


class _Stop(Exception):
    """SIGTERM, turned into an exception so the engine is closed as on Ctrl-C."""


def run_server(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_batch: int = 16, max_waiting: int = 64, device: str = "auto", dtype: str = "float32",
               on_ready: Callable[[list[str], list[str]], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM. `on_ready(urls, notes)` is called once the port accepts."""
    require_serve_extra()
    check_options(port, max_batch, max_waiting, api_key)
    sock = bind(host, port)
    engine = None
    try:
        from llmctl.loading import load_model

        loaded = load_model(checkpoint, device=device, dtype=dtype)
        from llmctl.batching import BatchGenerator
        from llmctl.serve_app import create_app

        engine = BatchGenerator(loaded, max_batch=max_batch, max_waiting=max_waiting)
        engine.start()
        name = model_name(loaded)
        app = create_app(loaded, engine, name, api_key=api_key, max_waiting=max_waiting)
        bound_port = sock.getsockname()[1]
        links = urls(host, bound_port)
        notes = [f"model {name!r}: {describe(loaded)}; up to {max_batch} replies at once, {max_waiting} waiting",
                 f"chat page {links[0]}  ·  OpenAI API {links[0]}v1  ·  Ctrl-C stops"]
        if api_key is None and not is_loopback(host):
            notes.append(f"warning: listening on {'every interface' if is_everywhere(host) else host} without an "
                         f"API key: anyone who can reach this machine can use the model; pass --api-key KEY "
                         f"(or set LLMCTL_API_KEY)")
        _serve(app, sock, lambda: on_ready(links, notes) if on_ready else None)
    finally:
        sock.close()
        if engine is not None:
            engine.close()


def describe(loaded: Any) -> str:
    template = ("chat template: messages render as in training" if loaded.template else
                "no chat template: chat messages are continued as plain text")
    return (f"context {loaded.context_length} tokens, {loaded.device.type} "
            f"{str(loaded.dtype).removeprefix('torch.')}, {template}")


def _serve(app: Any, sock: socket.socket, ready: Callable[[], None]) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                ready()

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none",
                            timeout_graceful_shutdown=GRACEFUL_S, server_header=False)

    def stop(*_: Any) -> None:
        raise _Stop

    # uvicorn catches SIGINT/SIGTERM while it serves, shuts down, then raises the signal again
    # against these handlers: both end here, quietly, with the engine closed by the caller.
    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    try:
        Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
