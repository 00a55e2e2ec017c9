"""Which build of the hot path runs (admission.native): compiled, or the Python source."""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from admission import native
from admission.decision import Decision, Hold, QuotaDefs, QuotaKind, Reason, Rendered

ROOT = Path(__file__).resolve().parent.parent
COMPILED_HERE = any(
    native.module_files(name, ROOT / name.partition(".")[0])[1] is not None
    for name in native.COMPILED
)


def _loaded_files(env: dict[str, str], *, pythonpath: Path | None = None) -> tuple[list[str], str]:
    """Import every module of COMPILED in a fresh interpreter: their files, and its stderr."""
    code = (
        "import importlib, gateway_plugin\n"
        "from admission import native\n"
        "for n in native.COMPILED:\n"
        "    print(importlib.import_module(n).__file__)\n"
        "print(native.status().reason)\n"
    )
    full = {k: v for k, v in os.environ.items() if k != native.PURE_ENV} | env
    if pythonpath is not None:
        full["PYTHONPATH"] = os.pathsep.join([str(pythonpath), full.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=full,
        cwd=pythonpath or ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines(), out.stderr


def test_a_build_runs_compiled_or_entirely_from_source() -> None:
    """Every module of COMPILED is loaded as an extension, or none is; in CI all of them."""
    for name in native.COMPILED:
        importlib.import_module(name)
    running = native.running_compiled()
    choice = native.status()
    if choice.compiled:
        assert running == list(native.COMPILED)
    else:
        assert running == []
    if os.environ.get("CI") and not os.environ.get(native.PURE_ENV):
        # CI installs with the mypyc hook: a build that silently fell back is a failure.
        assert choice.compiled, choice.reason


def test_the_environment_variable_runs_the_source() -> None:
    files, _ = _loaded_files({native.PURE_ENV: "1"})
    *modules, reason = files
    assert all(f.endswith(".py") for f in modules), modules
    assert len(modules) == len(native.COMPILED)
    if COMPILED_HERE:
        assert reason == f"Python source ({native.PURE_ENV} is set)"


def test_a_source_edited_after_the_build_runs_the_source(tmp_path: Path) -> None:
    """A checkout changed since `pip install -e .` must not run the old compiled code."""
    if not COMPILED_HERE:
        assert not os.environ.get("CI"), "CI builds the extension modules"
        pytest.skip("no extension modules in this checkout (built without the mypyc hook)")
    for package in ("admission", "gateway_plugin"):
        shutil.copytree(ROOT / package, tmp_path / package, symlinks=True)
    group = native.shared_library(next(ext for _, ext in _module_files() if ext is not None))
    assert group is not None and group[1] is not None, "the shared library beside the packages"
    shared = tmp_path / group[1].name
    shutil.copy2(group[1], shared)
    later = time.time() + 60
    os.utime(tmp_path / "admission" / "lease.py", (later, later))
    files, stderr = _loaded_files({}, pythonpath=tmp_path)
    *modules, reason = files
    assert all(f.endswith(".py") and f.startswith(str(tmp_path)) for f in modules), modules
    assert "lease.py changed after it was compiled" in reason
    assert "creditgate hot path: Python source: lease.py changed" in stderr

    # The same copy, not edited: the compiled build runs.
    built = (ROOT / "admission" / "lease.py").stat().st_mtime
    os.utime(tmp_path / "admission" / "lease.py", (built, built))
    files, stderr = _loaded_files({}, pythonpath=tmp_path)
    *modules, reason = files
    assert not any(f.endswith(".py") for f in modules), modules
    assert reason == "compiled (mypyc)" and stderr == ""
    # ... from the library beside its packages, not another copy of the same name.
    assert _shared_file({}, tmp_path, group[0]) == str(shared)

    # The library itself older than a source: stale too.
    old = (ROOT / "admission" / "lease.py").stat().st_mtime - 60
    os.utime(shared, (old, old))
    files, stderr = _loaded_files({}, pythonpath=tmp_path)
    *modules, reason = files
    assert all(f.endswith(".py") for f in modules), modules
    assert "changed after it was compiled" in reason


def _module_files() -> list[tuple[Path | None, Path | None]]:
    return [native.module_files(n, ROOT / n.partition(".")[0]) for n in native.COMPILED]


def _shared_file(env: dict[str, str], pythonpath: Path, name: str) -> str:
    code = f"import sys, gateway_plugin, admission.lease\nprint(sys.modules[{name!r}].__file__)\n"
    full = {k: v for k, v in os.environ.items() if k != native.PURE_ENV} | env
    full["PYTHONPATH"] = os.pathsep.join([str(pythonpath), full.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=full,
        cwd=pythonpath,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _files(
    tmp_path: Path, *, ext: bool = True, names: tuple[str, ...] = ("a", "b")
) -> list[tuple[Path | None, Path | None]]:
    out: list[tuple[Path | None, Path | None]] = []
    for name in names:
        src = tmp_path / f"{name}.py"
        src.write_text("")
        so = tmp_path / f"{name}.so"
        if ext:
            so.write_bytes(b"")
        out.append((src, so if ext else None))
    return out


def test_choose(tmp_path: Path) -> None:
    files = _files(tmp_path)
    assert native.choose(files, None) == native.Choice(True, "compiled (mypyc)")
    assert native.choose(files, "0").compiled
    assert native.choose(files, "").compiled
    assert not native.choose(files, "1").compiled
    # Written moments apart (a wheel's files, in either order): still the same build.
    src_a = files[0][0]
    assert src_a is not None
    os.utime(src_a, (time.time() + 1, time.time() + 1))
    assert native.choose(files, None).compiled
    os.utime(src_a, (time.time() + 30, time.time() + 30))
    stale = native.choose(files, None)
    assert not stale.compiled and "a.py changed after it was compiled" in stale.reason
    # The shared library holding the code counts as well.
    shared = tmp_path / "group.so"
    shared.write_bytes(b"")
    os.utime(src_a, (time.time() - 30, time.time() - 30))
    assert native.choose(files, None, shared).compiled
    os.utime(shared, (time.time() - 90, time.time() - 90))
    assert not native.choose(files, None, shared).compiled
    partial = [files[0], (files[1][0], None)]
    assert not native.choose(partial, None).compiled
    assert "only some modules" in native.choose(partial, None).reason
    (tmp_path / "plain").mkdir()
    none = _files(tmp_path / "plain", ext=False)
    assert native.choose(none, None) == native.Choice(
        False, "not compiled (built without mypyc, or compiling failed)"
    )


def test_the_per_request_values_copy_and_pickle_in_either_build() -> None:
    """Hand-written classes compiled by mypyc cannot be rebuilt without their __init__
    arguments: copy and pickle go through __reduce__ (found in review)."""
    hold = Hold("L1", "p", 3, 5, "work", "requests", False, ("cg:c",))
    defs: QuotaDefs = (("requests", QuotaKind.RATE, 10, 60),)
    rendered = Rendered('"requests";q=10;w=60', '"requests";r=9;t=60', defs, (9, 60))
    decision = Decision(True, Reason.ADMITTED, "p", hold, None, rendered=rendered)
    for value in (hold, decision, Decision(False, Reason.RATE_LIMITED, "p", quotas=())):
        for again in (copy.copy(value), copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
            assert again == value and again is not value
    again = pickle.loads(pickle.dumps(decision))
    assert again.quotas == decision.quotas and again.quotas[0].remaining == 9
    assert again.rendered is not None and again.rendered.ratelimit == rendered.ratelimit
