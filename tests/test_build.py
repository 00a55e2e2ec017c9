"""The package build (scripts/hatch_build.py): with no working C compiler it still builds.

A machine without a C compiler or Python's headers gets the plain Python package and a
warning; CREDITGATE_REQUIRE_COMPILED=1 (which CI sets) makes the same build fail instead.
Both builds are real `pip wheel` runs of a copy of the project, with CC pointing at a
compiler that always fails. The normal, compiled build is what every other test runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = (
    "pyproject.toml",
    "README.md",
    "scripts",
    "admission",
    "gateway_plugin",
    "creditservice",
)


def _project_copy(dest: Path) -> Path:
    """The sources the wheel is built from, without this checkout's build products."""
    src = dest / "src"
    src.mkdir(parents=True)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.db*", "build")
    for name in PROJECT_FILES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    return src


def _build(src: Path, out: Path, **env: str) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if k != "CREDITGATE_REQUIRE_COMPILED"}
    full.update(env, CC="/bin/false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(src)],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_without_a_compiler_the_plain_package_is_built_unless_required(tmp_path: Path) -> None:
    plain_src = _project_copy(tmp_path / "plain")
    required_src = _project_copy(tmp_path / "required")
    # Two builds at once: each spends most of its time type-checking before the compiler runs.
    plain = _build(plain_src, tmp_path / "plain-dist")
    required = _build(required_src, tmp_path / "required-dist", CREDITGATE_REQUIRE_COMPILED="1")
    plain_out, _ = plain.communicate(timeout=600)
    required_out, _ = required.communicate(timeout=600)

    assert plain.returncode == 0, plain_out[-4000:]
    assert "compiling the hot path with mypyc failed" in plain_out, plain_out[-4000:]
    (wheel,) = (tmp_path / "plain-dist").glob("creditgate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "admission/lease.py" in names and "gateway_plugin/middleware.py" in names
    assert [n for n in names if n.endswith((".so", ".pyd", ".c"))] == []
    # Nothing half-built stays beside the copied sources either.
    assert list(plain_src.rglob("*.so")) == []

    assert required.returncode != 0, required_out[-4000:]
    assert not list((tmp_path / "required-dist").glob("*.whl"))


def test_the_hot_path_type_checks_for_mypyc_without_the_runtime_dependencies(
    tmp_path: Path,
) -> None:
    """The first build on a fresh machine runs before redis, aiohttp and the rest are installed:
    mypyc's type check must pass when every one of them is Any, or that build falls back to the
    slower Python package (it once did, for `RedisClient = Redis | RedisCluster`)."""
    hook = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["hooks"]["custom"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    check = subprocess.run(
        [sys.executable, "-m", "mypy", *hook["mypy-args"], "--no-site-packages", *cache]
        + hook["include"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-2000:]
