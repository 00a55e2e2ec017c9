"""Instructions per request: bare aiohttp and the plugin under callgrind, a figure that does
not move with the machine's load.

The req/s of bench/gateway_bench.py is the figure users feel, but on a shared machine two runs
of the same build can differ by a third. This counts the instructions the server process runs
per request instead (valgrind's callgrind, counting idle, then while the load runs), so that a
change to the hot path can be judged by a few hundred instructions. Run:

    python bench/instructions.py [--servers bare,plugin-no-flusher] [--seconds 10]

Needs valgrind (`apt-get install valgrind`) and wrk. Each server runs under callgrind (about
50 times slower), is warmed up, counted idle, then over one wrk run of `--connections`
connections.

What is counted is the request path. Work done per unit of time would be charged to the few
hundred requests a slowed-down server answers per second, a hundred times its weight at full
speed: each server is first counted idle for `--idle` seconds, and "request path" is the
load's count less that idle rate's share of the load run (the metrics fold every second, lease
syncs, the flusher). The plugin's leases sync every 5 s here instead of every 20 ms
(`lease_sync_ms`). "instructions/request" keeps everything. Request-path counts vary by about
0.5% between runs (loop iterations batch a varying number of requests). The report names the
build the servers run (compiled or the Python source, as bench/gateway_bench.py's does): a
module edited since the last `pip install -e .` runs as source. `--keep DIR` keeps the
callgrind files (FILE.1 is the idle part) for callgrind_annotate.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway_bench as gb  # bench/gateway_bench.py, beside this script: its server modes

SERVERS = (
    "bare",
    "null-wrap",
    "null-hook",
    "null-mw",
    "null-plugin",
    "plugin-no-flusher",
    "plugin",
)
SYNC_MS = 5000


def _totals(part: Path) -> int:
    """The instructions one callgrind output file (one part of a run) counted."""
    for line in part.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return 0


def _wrk(url: str, token: str, connections: int, seconds: int) -> int:
    out = gb.wrk_output(url, token, connections, seconds)
    m = re.search(r"(\d+) requests in", out)
    if m is None:
        raise RuntimeError(f"no request count in wrk's output:\n{out}")
    # Requests that failed did work that is counted, but are not in the count: refuse.
    for problem in (r"Non-2xx or 3xx responses: \d+", r"Socket errors: [^\n]+"):
        found = re.search(problem, out)
        if found is not None:
            raise RuntimeError(f"{found.group(0)}:\n{out}")
    return int(m.group(1))


@dataclass
class Counted:
    """One server's counted run: its requests, the instructions counted while wrk ran, and the
    instructions per second the same process ran idle just before (its per-second work)."""

    requests: int
    instructions: int
    load_seconds: float
    idle_per_second: float

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests

    @property
    def request_path(self) -> float:
        """Per request, with the idle rate's share of the load run taken out: a figure that
        does not depend on how many requests callgrind let through."""
        background = self.idle_per_second * self.load_seconds
        return (self.instructions - background) / self.requests


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def count(
    mode: str, common: list[str], secret: str, args: argparse.Namespace, keep: Path
) -> Counted:
    """One server mode: counted idle for `args.idle` s, then over one wrk run."""
    out = keep / f"callgrind.{mode}.out"
    for stale in keep.glob(out.name + "*"):  # parts of an earlier run kept in the same place
        stale.unlink()
    port = gb._free_port()
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            gb.__file__,
            mode,
            "--port",
            str(port),
            "--lease-sync-ms",
            str(SYNC_MS),
            *common,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        gb._wait_port(port, proc, deadline_s=180)
        url = f"http://127.0.0.1:{port}/work"
        _wrk(url, secret, args.connections, args.warmup)
        pid = str(proc.pid)
        _control("-i", "on", pid)
        idle_from = time.monotonic()
        time.sleep(args.idle)  # the server's own per-second work, with no request
        _control("-d", pid)  # the idle part, in its own file
        load_from = time.monotonic()
        idle_seconds = load_from - idle_from
        requests = _wrk(url, secret, args.connections, args.seconds)
        _control("-i", "off", pid)
        load_seconds = time.monotonic() - load_from
    finally:
        gb._stop(proc, wait_s=120)  # callgrind writes its last part as the server exits
    parts = sorted(out.parent.glob(out.name + "*"))
    idle = sum(_totals(p) for p in parts if p != out)
    instructions = _totals(out) if out.exists() else 0
    if instructions == 0 or requests == 0 or idle == 0:
        raise RuntimeError(f"{mode}: callgrind counted nothing (did the server have to be killed?)")
    return Counted(requests, instructions, load_seconds, idle / idle_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="bare,plugin-no-flusher")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--idle", type=float, default=5, help="seconds counted idle first (per-second work)"
    )
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this directory")
    args = parser.parse_args(argv)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            raise SystemExit(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install valgrind wrk)")

    from tests.services import start_redis

    token = "t" + secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="cg-instr-"))
    keep = args.keep or workdir
    keep.mkdir(parents=True, exist_ok=True)
    redis = start_redis()
    authority, authority_port = gb._spawn(
        "authority", "--db", str(workdir / "a.db"), "--token", token
    )
    target = f"127.0.0.1:{authority_port}"
    results: dict[str, Counted] = {}
    try:
        project = f"bench-{secrets.token_hex(4)}"
        secret = asyncio.run(gb._create_project(target, token, project))
        common = ["--redis-url", redis.url, "--authority", target, "--token", token]
        for mode in servers:
            results[mode] = count(mode, common, secret, args, keep)
    finally:
        gb._stop(authority)
        redis.stop()
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    bare = results.get("bare")
    from admission import native

    print(f"\ncallgrind, {args.connections} connections, {args.seconds} s counted per server")
    print(f"plugin hot path: {native.status().reason}")
    print(
        f"{'server':<20}{'requests':>10}{'idle instr/s':>14}{'instructions/request':>22}"
        f"{'request path':>14}{'bare / server':>15}"
    )
    for mode, c in results.items():
        ratio = f"{bare.request_path / c.request_path:.3f}" if bare else "-"
        print(
            f"{mode:<20}{c.requests:>10}{c.idle_per_second:>14,.0f}{c.per_request:>22,.0f}"
            f"{c.request_path:>14,.0f}{ratio:>15}"
        )
    print(
        "\ninstructions/request: all the process ran during the load, over its requests; "
        "request path: the same less the idle rate's share (per-second work such as the "
        "metrics fold), which does not depend on how many requests callgrind let through"
    )
    if args.keep is not None:
        print(f"\ncallgrind files in {keep} (callgrind_annotate --inclusive=yes FILE)")


if __name__ == "__main__":
    main()
