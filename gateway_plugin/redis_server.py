"""A private redis-server child process on a free loopback port, for `creditgate demo`.

Persistence is off and the working directory is the caller's, so nothing outlives the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "redis-server not found: install it: apt-get install redis-server"


class RedisServerError(RuntimeError):
    """redis-server is missing, or the child exited before it listened."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A running redis-server child; `stop()` terminates it and waits for the exit."""

    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


@functools.cache
def die_with_parent() -> tuple[str, ...]:
    """A command prefix that makes the child get SIGKILL when the thread that started it ends
    (util-linux `setpriv --pdeathsig`), so that a parent killed with SIGKILL leaves no
    redis-server behind (KILL, not TERM: it also ends a Redis stopped with SIGSTOP; nothing
    is persisted anyway). Empty when setpriv is missing or cannot do it (util-linux before
    2.33, busybox): checked once by running it. Start the child from a thread that lives as
    long as the process (the main thread), not from a worker thread."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    prefix = (setpriv, "--pdeathsig", "KILL")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    return prefix if probe.returncode == 0 else ()


def _spawn(workdir: Path) -> RedisServer:
    binary = find_redis_server()
    if binary is None:
        raise RedisServerError(INSTALL_HINT)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            *die_with_parent(),
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(workdir / "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Own session: a terminal Ctrl-C reaches only the demo, which stops Redis last, after
        # the gateway has drained and the flusher has settled the outbox.
        start_new_session=True,
    )
    return RedisServer(port, proc)


def _wait_listening(server: RedisServer, workdir: Path, deadline_s: float) -> None:
    proc, port = server.proc, server.port
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RedisServerError(
                f"redis-server exited with {proc.returncode}; see {workdir / 'redis.log'}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.01)  # polling the port with a deadline
    server.stop()
    raise RedisServerError(f"redis-server did not listen on 127.0.0.1:{port} in {deadline_s}s")


def start_redis_server(workdir: Path, *, deadline_s: float = 10.0) -> RedisServer:
    """Start redis-server on a free port and return once it accepts connections."""
    server = _spawn(workdir)
    _wait_listening(server, workdir, deadline_s)
    return server


async def start_redis_server_async(workdir: Path, *, deadline_s: float = 10.0) -> RedisServer:
    """start_redis_server for the event loop: started from the loop's thread (see
    die_with_parent), waited for in a worker thread."""
    server = _spawn(workdir)
    try:
        await asyncio.to_thread(_wait_listening, server, workdir, deadline_s)
    except BaseException:
        server.stop()
        raise
    return server
