"""`creditgate demo` as a user runs it: a subprocess on a fresh state directory."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_plugin.demo import curl_lines
from gateway_plugin.redis_server import die_with_parent
from tests.services import eventually

CLI = [sys.executable, "-m", "gateway_plugin.cli", "demo"]


def demo_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CREDITGATE_ADMIN_TOKEN")}


def redis_pid(output: str) -> int:
    m = re.search(r"redis-server pid (\d+), started by the demo", output)
    assert m, output
    return int(m.group(1))


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody has reaped yet (orphans go to pid 1)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while not gone(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)  # polling the process table, with a deadline
    return True


def gateway_base(output: str) -> str:
    m = re.search(r"gateway +(http://127\.0\.0\.1:\d+)", output)
    assert m, output
    return m.group(1)


def api_key(output: str) -> str:
    m = re.search(r"API key +(cg_[A-Za-z0-9_-]{43})\b", output)
    assert m, output
    return m.group(1)


def run_demo(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--state-dir", str(state), "--port", "0", *extra],
        capture_output=True,
        text=True,
        timeout=90,
        env=demo_env(),
        check=False,
    )


def test_demo_runs_the_three_requests_and_leaves_nothing_running(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = run_demo(state, "--exit-after", "0.2")
    out = first.stdout
    assert first.returncode == 0, out + first.stderr
    base, secret = gateway_base(out), api_key(out)
    for line in curl_lines(base, secret):
        assert line in out, line
    assert "for i in $(seq 8)" in out
    m = re.search(r"check: admitted (\d+); rate-limit loop ([\d ]+); credits (\d+)", out)
    assert m, out
    assert m.group(1) == "200"
    loop = m.group(2).split()
    assert len(loop) == 8 and loop[0] == "200" and "429" in loop
    assert m.group(3) == "402"
    assert f"{base}/_creditgate/dashboard#token=" in out
    assert f"{base}/metrics" in out
    assert gone(redis_pid(out))
    assert (state / "authority.db").exists()
    assert oct((state / "api-key").stat().st_mode & 0o777) == "0o600"

    # Rerun with the same state: same project, same key, the printed lines still work.
    second = run_demo(state, "--check")
    assert second.returncode == 0, second.stdout + second.stderr
    assert api_key(second.stdout) == secret
    assert "check: admitted 200;" in second.stdout
    balances = [
        int(re.search(r"balance (\d+) credits", o).group(1))  # type: ignore[union-attr]
        for o in (out, second.stdout)
    ]
    assert balances[1] < balances[0]  # the first run's usage reached the authority ledger
    assert gone(redis_pid(second.stdout))


def start_demo(
    state: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """The demo running until it printed "ready"; its process and output so far."""
    proc = subprocess.Popen(
        [*CLI, "--state-dir", str(state), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**demo_env(), **(env or {})},
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # blocks per line; the test timeout bounds it
        lines.append(line)
        if line.strip() == "ready":
            break
    return proc, "".join(lines)


@contextlib.contextmanager
def stopping(proc: subprocess.Popen[str]) -> Iterator[None]:
    """Kills the demo if the block fails, so that a failed test leaves nothing running."""
    try:
        yield
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def stop(proc: subprocess.Popen[str], signum: signal.Signals) -> tuple[str, str]:
    """Stops the demo with `signum`; its remaining output once it exited 0 (else it fails)."""
    with stopping(proc):
        proc.send_signal(signum)
        rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return rest, err


def hello(output: str) -> int:
    """Status of one admitted request (/v1/hello, 1 credit) to the demo that printed `output`."""
    req = urllib.request.Request(
        gateway_base(output) + "/v1/hello",
        headers={"Authorization": f"Bearer {api_key(output)}"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(r.status)


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["INT", "TERM", "HUP"]
)
def test_a_stop_signal_stops_everything(tmp_path: Path, signum: signal.Signals) -> None:
    """Ctrl-C, a service manager's SIGTERM, or the terminal closing (SIGHUP)."""
    proc, out = start_demo(tmp_path / "s")
    with stopping(proc):
        assert hello(out) == 200
    rest, _ = stop(proc, signum)
    assert "stopped" in rest
    assert gone(redis_pid(out))


def test_a_closed_terminal_still_stops_everything_in_order(tmp_path: Path) -> None:
    """The terminal goes away before the hang-up: the demo's next line of output fails
    (EIO on a tty, EPIPE on a pipe). It must still drain the gateway and settle the outbox
    before it stops Redis: the request made before reaches the ledger."""
    state = tmp_path / "s"
    proc, out = start_demo(state)
    try:
        assert hello(out) == 200
        assert proc.stdout is not None
        proc.stdout.close()  # the reader of the demo's output is gone
        proc.send_signal(signal.SIGHUP)
        assert proc.stderr is not None
        with proc.stderr:
            err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert wait_gone(redis_pid(out))
    balance = re.search(r"balance (\d+) credits", out)
    again = run_demo(state, "--exit-after", "0")
    balance_after = re.search(r"balance (\d+) credits", again.stdout)
    assert balance and balance_after, again.stdout + again.stderr
    assert int(balance_after.group(1)) == int(balance.group(1)) - 1  # /v1/hello costs 1


def test_a_killed_demo_leaves_no_redis_server(tmp_path: Path) -> None:
    """SIGKILL gives the demo no chance to stop its Redis: the child is told by the kernel."""
    assert die_with_parent(), "setpriv --pdeathsig missing: install util-linux (bootstrap.sh)"
    proc, out = start_demo(tmp_path / "s")
    proc.kill()
    proc.communicate(timeout=30)
    pid = redis_pid(out)
    if not wait_gone(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise AssertionError("redis-server outlived the killed demo")


def test_missing_redis_server_binary(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = demo_env()
    env["PATH"] = str(bindir)
    done = subprocess.run(
        [
            str(bindir / "python"),
            "-m",
            "gateway_plugin.cli",
            "demo",
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "redis-server not found: install it: apt-get install redis-server"
    ]
    assert not (tmp_path / "s").exists()


async def test_traffic_on_a_redis_from_redis_url(tmp_path: Path, redis_url: str) -> None:
    """REDIS_URL: the demo uses that Redis and starts none. --traffic: requests flow on their
    own, so the gateway's decision counters move with nobody calling it."""
    import aiohttp

    proc, out = start_demo(tmp_path / "s", "--traffic", env={"REDIS_URL": redis_url})
    with stopping(proc):
        assert f"redis      {redis_url} (from REDIS_URL)" in out, out
        assert "started by the demo" not in out
        async with aiohttp.ClientSession() as http:

            async def admitted_some() -> bool:
                async with http.get(gateway_base(out) + "/metrics") as r:
                    metrics = await r.text()
                admitted = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in metrics.splitlines()
                    if line.startswith("creditgate_decisions_total{")
                    and 'outcome="admitted"' in line
                )
                return admitted >= 3

            await eventually(admitted_some, within_s=20, every_s=0.1)
    rest, _ = stop(proc, signal.SIGINT)
    assert "stopped" in rest


async def test_the_check_names_a_promised_header_or_body_type_that_is_missing(
    aiohttp_server: Any,
) -> None:
    """run_check, against a server answering the right statuses without what the README
    promises with them (RateLimit fields, Retry-After, problem+json)."""
    from aiohttp import web

    from gateway_plugin.demo import run_check

    calls: list[int] = []

    async def hello(request: web.Request) -> web.Response:
        calls.append(1)
        return web.Response(text="hi") if len(calls) <= 5 else web.Response(status=429)

    async def report(request: web.Request) -> web.Response:
        return web.Response(status=402, text="pay")

    app = web.Application()
    app.router.add_get("/v1/hello", hello)
    app.router.add_post("/v1/report", report)
    server = await aiohttp_server(app)
    result = await run_check(str(server.make_url("")).rstrip("/"), "cg_x")
    assert (result.admitted, result.loop[-1], result.credits) == (200, 429, 402)
    assert not result.ok  # the statuses are right; what comes with them is not
    assert "GET /v1/hello -> 200 without RateLimit-Policy, RateLimit" in result.problems
    assert "POST /v1/report -> 402 without Retry-After" in result.problems
    assert "POST /v1/report -> 402 as text/plain" in result.problems
    assert "GET /v1/hello -> 429 without Retry-After, RateLimit-Policy, RateLimit" in (
        result.problems
    )
