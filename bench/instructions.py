"""Instructions per request: bare aiohttp and the plugin under callgrind, a figure that does
not move with the machine's load.

The req/s of bench/gateway_bench.py is the figure users feel, but on a shared machine two runs
of the same build can differ by a third. This counts the instructions the server process runs
per request instead (valgrind's callgrind, counting only while the load runs), so that a
change to the hot path can be judged by a few hundred instructions. Run:

    python bench/instructions.py [--servers bare,plugin-no-flusher] [--seconds 10]

Needs valgrind (`apt-get install valgrind`) and wrk. Each server runs under callgrind (about
50 times slower), is warmed up, then counted over one wrk run of `--connections` connections.

What is counted is the request path. Work done per unit of time is mostly left out, or it
would be charged to the few hundred requests a slowed-down server answers per second: the
plugin's leases sync every 5 s here instead of every 20 ms (`lease_sync_ms`), and the default
server is plugin-no-flusher (the flusher wakes per unit of time too); the once-a-second
metrics fold still counts. Counts vary by about 1% between runs (loop iterations batch a
varying number of requests); a smaller difference needs several runs. The report names the
build the servers run (compiled or the Python source, as bench/gateway_bench.py's does): a
module edited since the last `pip install -e .` runs as source. `--keep DIR` keeps the
callgrind files for callgrind_annotate.
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


def _totals(out: Path) -> int:
    """The instructions a callgrind output file counted (summed over its parts)."""
    total = 0
    for part in out.parent.glob(out.name + "*"):
        for line in part.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


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


def count(
    mode: str, common: list[str], secret: str, args: argparse.Namespace, keep: Path
) -> tuple[int, int]:
    """(requests, instructions) of one server mode over one counted wrk run."""
    out = keep / f"callgrind.{mode}.out"
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
        subprocess.run(
            ["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True
        )
        requests = _wrk(url, secret, args.connections, args.seconds)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True
        )
    finally:
        gb._stop(proc, wait_s=120)  # callgrind writes its file as the server exits
    instructions = _totals(out)
    if instructions == 0 or requests == 0:
        raise RuntimeError(f"{mode}: callgrind counted nothing (did the server have to be killed?)")
    return requests, instructions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="bare,plugin-no-flusher")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
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
    results: dict[str, tuple[int, int]] = {}
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
    per_bare = bare[1] / bare[0] if bare else None
    from admission import native

    print(f"\ncallgrind, {args.connections} connections, {args.seconds} s counted per server")
    print(f"plugin hot path: {native.status().reason}")
    print(f"{'server':<20}{'requests':>10}{'instructions/request':>24}{'bare / server':>16}")
    for mode, (requests, instructions) in results.items():
        per = instructions / requests
        ratio = f"{per_bare / per:.3f}" if per_bare else "-"
        print(f"{mode:<20}{requests:>10}{per:>24,.0f}{ratio:>16}")
    if args.keep is not None:
        print(f"\ncallgrind files in {keep} (callgrind_annotate --inclusive=yes FILE)")


if __name__ == "__main__":
    main()
