"""bench/gateway_bench.py still runs end to end: a one-round, one-second run of bare aiohttp and
the plugin side by side. It checks that the report is complete, not what it says: speed
figures belong to the benchmark's own runs (README, "Performance"), never to a test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gateway_bench.py"


def test_the_gateway_bench_reports_both_servers_and_their_ratio() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--servers",
            "bare,plugin",
            "--repeat",
            "1",
            "--seconds",
            "1",
            "--warmup",
            "0.5",
            "--loader",
            "aiohttp",  # wrk need not be installed
            "--connections",
            "4",
            "--no-half-load",
            "--cold",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(bare|plugin) +(\d+) ", out.stdout, re.MULTILINE)
    }
    assert set(rows) == {"bare", "plugin"}, out.stdout
    assert all(int(v) > 0 for v in rows.values()), out.stdout
    plugin = re.search(r"^plugin +\d+ +[\d.]+ +[\d.]+ +([\d.]+) +0 ", out.stdout, re.MULTILINE)
    assert plugin is not None and float(plugin.group(1)) > 0, out.stdout  # ratio, no non-2xx
    assert re.search(r"cold project, first request .* 2 projects: p50 [\d.]+ ms", out.stdout)
