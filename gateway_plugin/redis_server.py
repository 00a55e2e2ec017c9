"""A private redis-server child process on a free loopback port, for `creditgate demo`.

Persistence is off and the working directory is the caller's, so nothing outlives the child.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def start_redis_server(workdir: Path, *, deadline_s: float = 10.0) -> RedisServer:
    """Start redis-server on a free port and return once it accepts connections."""
    binary = find_redis_server()
    if binary is None:
        raise RedisServerError(INSTALL_HINT)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [
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
    server = RedisServer(port, proc)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RedisServerError(
                f"redis-server exited with {proc.returncode}; see {workdir / 'redis.log'}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return server
        time.sleep(0.01)  # polling the port with a deadline
    server.stop()
    raise RedisServerError(f"redis-server did not listen on 127.0.0.1:{port} in {deadline_s}s")


async def start_redis_server_async(workdir: Path) -> RedisServer:
    return await asyncio.to_thread(start_redis_server, workdir)
