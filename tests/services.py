"""Real services for tests: redis-server processes on free ports and a private PostgreSQL database.

Nothing here touches data it did not create: each Redis is a new process with no persistence,
and each PostgreSQL database is created with a random name and dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway_plugin.redis_server import die_with_parent

REDIS_SERVER = os.environ.get("REDIS_SERVER_BIN", "redis-server")
REDIS_CLI = os.environ.get("REDIS_CLI_BIN", "redis-cli")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(below: int = 65536) -> int:
    """A free loopback port; `below` leaves room for Redis Cluster's bus port (port + 10000)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below and (below == 65536 or _port_is_free(port + 10000)):
            return port
    raise RuntimeError("no free port found")


async def eventually(
    check: Callable[[], Awaitable[bool]], within_s: float = 1.0, every_s: float = 0.005
) -> None:
    """Poll `check` until it holds; fails if it does not within `within_s` (the default, 1 s,
    is invariant 6's bound). `every_s`: the pause between checks that cost the system under
    test something (an HTTP request, a connection)."""
    async with asyncio.timeout(within_s):
        while True:
            if await check():
                return
            await asyncio.sleep(every_s)  # polling a condition with a deadline


def wait_for_port(
    port: int, deadline_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process listening on {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.01)  # polling a condition with a deadline, not waiting for time
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline_s}s")


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(
            f"{binary} not found: install it (apt-get install redis-server);"
            " the tests need a real Redis"
        )
    return path


# Each test that writes outbox streams gets a logical database of its own (see fresh_db_url),
# so one test's flusher never settles another test's events.
DATABASES = 4096


@dataclass
class RedisProcess:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    _next_db: int = 1
    # The temporary directory start_redis made for it: removed by stop().
    owns_workdir: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def fresh_db_url(self) -> str:
        """URL of a logical database no other test of this session has used."""
        if self._next_db >= DATABASES:
            raise RuntimeError("this redis-server has no unused logical database left")
        db, self._next_db = self._next_db, self._next_db + 1
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis(*extra: str, workdir: Path | None = None, cluster: bool = False) -> RedisProcess:
    binary = _require(REDIS_SERVER)
    port = free_port(below=55535 if cluster else 65536)
    owned = workdir is None
    wd = workdir or Path(tempfile.mkdtemp(prefix="cg-redis-"))
    proc = subprocess.Popen(
        [
            # A test process killed before stop() leaves no redis-server behind.
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
            "--databases",
            str(DATABASES),
            "--dir",
            str(wd),
            "--logfile",
            str(wd / "redis.log"),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        proc.kill()
        proc.wait(5)
        if owned:
            shutil.rmtree(wd, ignore_errors=True)
        raise
    return RedisProcess(port, proc, wd, owns_workdir=owned)


@dataclass
class RedisCluster:
    nodes: list[RedisProcess] = field(default_factory=list)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def _cluster_node_ready(cli: str, port: int, masters: int) -> bool:
    out = subprocess.run(
        [cli, "-p", str(port), "cluster", "info"],
        check=False,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout
    return (
        "cluster_state:ok" in out
        and "cluster_slots_ok:16384" in out
        and f"cluster_known_nodes:{masters}" in out
    )


def start_redis_cluster(masters: int = 3) -> RedisCluster:
    cli = _require(REDIS_CLI)
    cluster = RedisCluster()
    try:
        for _ in range(masters):
            wd = Path(tempfile.mkdtemp(prefix="cg-rcluster-"))
            cluster.nodes.append(
                start_redis(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(wd / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    workdir=wd,
                    cluster=True,
                )
            )
            cluster.nodes[-1].owns_workdir = True
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in cluster.nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        end = time.monotonic() + 20
        while time.monotonic() < end:
            # Every node must agree, not only the first: a node that has not yet learnt the
            # slot map answers CLUSTERDOWN or MOVED loops to the first test that uses it.
            if all(_cluster_node_ready(cli, n.port, masters) for n in cluster.nodes):
                return cluster
            time.sleep(0.05)  # polling cluster_state with a deadline
        raise RuntimeError("redis cluster did not reach cluster_state:ok")
    except Exception:
        cluster.stop()
        raise


_BOOTSTRAP_DSN_FILE = Path(__file__).resolve().parent.parent / ".pg-dsn.env"


def postgres_admin_dsn() -> str:
    """CREDITGATE_TEST_PG_DSN, else the DSN scripts/bootstrap.sh wrote when it had to start a
    PostgreSQL itself (.pg-dsn.env), else the local server with trust auth."""
    dsn = os.environ.get("CREDITGATE_TEST_PG_DSN")
    if dsn:
        return dsn
    if _BOOTSTRAP_DSN_FILE.is_file():
        for line in _BOOTSTRAP_DSN_FILE.read_text(encoding="utf-8").splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip() == "CREDITGATE_TEST_PG_DSN" and value.strip():
                return value.strip()
    return "postgresql://postgres@127.0.0.1:5432/test"


@contextlib.contextmanager
def private_postgres_database() -> Iterator[str]:
    """Create a database with a random name on the test server, yield its DSN, drop it after."""
    import asyncio

    import asyncpg

    admin = postgres_admin_dsn()
    name = f"cg_test_{uuid.uuid4().hex[:12]}"

    async def run(sql: str) -> None:
        try:
            conn = await asyncpg.connect(admin, timeout=10)
        except Exception as exc:
            raise RuntimeError(
                f"PostgreSQL at {admin} is not reachable ({exc}); set CREDITGATE_TEST_PG_DSN"
            ) from exc
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE DATABASE "{name}"'))
    base, _, _ = admin.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
