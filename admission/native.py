"""Which build of the hot-path modules runs: compiled with mypyc, or their Python source.

The modules in COMPILED (admission and its HTTP middleware, per request) are ordinary typed
Python. When the package is built (a wheel, or `pip install -e .`) the hatch-mypyc build hook
compiles them to C extension modules (pyproject.toml, scripts/hatch_build.py; a failed compile
builds the plain package); the source ships beside them and stays the reference. Python
imports an extension module before a source file of the same name, so the compiled build runs
unless this module steers the import to the source, which it does, for all of COMPILED
together, when

- CREDITGATE_PURE_PYTHON is set (not "" or "0"): for profilers and debuggers, which do not
  see inside compiled code, and to compare the two builds;
- the build is stale: a source file is newer than its extension (a checkout edited or switched
  since the last build; `pip install -e .` rebuilds), or only some modules are compiled. A
  warning says so once.

All or nothing: compiled modules use one another's native classes directly, so a compiled
lease module beside a source decision module would make Decisions of another class.

The compiled code itself lives in one shared library beside the packages (see
shared_library); the per-module extensions only import it by a name that does not change
between builds. install() loads the copy beside the packages, whose age counts in the stale
check too, so another checkout's build of the same name can never run instead.

`install()` runs when the `admission` package is imported (gateway_plugin imports it first),
before any of COMPILED is. `status()` says which build runs, for the CLI, demo and bench.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

log = logging.getLogger("creditgate")

COMPILED = (
    "admission.decision",
    "admission.identity",
    "admission.lease",
    "admission.policy",
    "gateway_plugin.handle",
    "gateway_plugin.headers",
    "gateway_plugin.hot",
    "gateway_plugin.middleware",
)
PURE_ENV = "CREDITGATE_PURE_PYTHON"
# A source newer than its extension by more than this is an edit after the build (installing a
# wheel writes both files within moments, in either order).
_STALE_AFTER_S = 2.0


@dataclass(frozen=True)
class Choice:
    compiled: bool  # the extension modules run
    reason: str  # why, in words for a log line or the demo's banner


def choose(
    files: Sequence[tuple[Path | None, Path | None]],
    env: str | None,
    shared: Path | None = None,
) -> Choice:
    """The build to run, from each module's (source, extension) files, the shared library
    that holds their compiled code (when found) and PURE_ENV's value."""
    extensions = [ext for _, ext in files if ext is not None]
    if not extensions:
        return Choice(False, "not compiled (built without mypyc, or compiling failed)")
    if env not in (None, "", "0"):
        return Choice(False, f"Python source ({PURE_ENV} is set)")
    if len(extensions) < len(files):
        return Choice(False, "Python source: only some modules are compiled; rebuild")
    for src, ext in files:
        if (
            src is not None
            and ext is not None
            and (_newer(src, ext) or (shared is not None and _newer(src, shared)))
        ):
            return Choice(
                False,
                f"Python source: {src.name} changed after it was compiled; "
                "`pip install -e .` rebuilds",
            )
    return Choice(True, "compiled (mypyc)")


def _newer(src: Path, ext: Path) -> bool:
    return src.stat().st_mtime > ext.stat().st_mtime + _STALE_AFTER_S


def module_files(name: str, package_dir: Path) -> tuple[Path | None, Path | None]:
    """(source, extension) of module `name` in `package_dir`, each None when absent."""
    leaf = name.rpartition(".")[2]
    src = package_dir / f"{leaf}.py"
    ext = next(
        (
            package_dir / f"{leaf}{suffix}"
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (package_dir / f"{leaf}{suffix}").exists()
        ),
        None,
    )
    return (src if src.exists() else None), ext


def shared_library(ext: Path) -> tuple[str, Path | None] | None:
    """The module name of the library holding a compiled module's code, and its file when it
    lies beside the packages (a wheel's site-packages, or the checkout of an editable install).

    mypyc compiles the modules of one build into one library named after the set of modules,
    not their content; each module's own extension only imports it by that name. An editable
    install also puts a copy in site-packages, which another checkout's install replaces:
    install() loads the one beside the packages, built with the extensions next to it.
    """
    found = _GROUP_RE.search(ext.read_bytes())
    if found is None:
        return None
    name = found.group(1).decode()
    root = ext.parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (root / f"{name}{suffix}").exists():
            return name, root / f"{name}{suffix}"
    return name, None


_GROUP_RE = re.compile(rb"([0-9a-f]{20}__mypyc)\x00")


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of COMPILED as their .py source, ahead of the extension modules."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED or path is None:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            source = Path(entry) / f"{leaf}.py"
            if source.exists():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


_choice: Choice | None = None


def _package_dir(package: str) -> Path | None:
    if package == __package__:
        return Path(__file__).resolve().parent
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def install() -> Choice:
    """Decide once per process; put the source finder first when the source is to run."""
    global _choice  # noqa: PLW0603 - one decision per process, made at the first import
    if _choice is not None:
        return _choice
    files: list[tuple[Path | None, Path | None]] = []
    for name in COMPILED:
        package_dir = _package_dir(name.rpartition(".")[0])
        files.append(module_files(name, package_dir) if package_dir else (None, None))
    first_ext = next((ext for _, ext in files if ext is not None), None)
    group = shared_library(first_ext) if first_ext is not None else None
    _choice = choose(files, os.environ.get(PURE_ENV), group[1] if group else None)
    if _choice.compiled and group is not None:
        name, path = group
        if path is not None:
            _choice = _load_shared(name, path) or _choice
    if not _choice.compiled and any(ext is not None for _, ext in files):
        loaded = [n for n in COMPILED if n in sys.modules]
        if loaded:  # imported before install(): too late to choose
            raise ImportError(f"{', '.join(loaded)} imported before admission.native.install()")
        sys.meta_path.insert(0, _SourceFinder())
        if "is set" not in _choice.reason:
            log.warning("creditgate hot path: %s", _choice.reason)
    return _choice


def _load_shared(name: str, path: Path) -> Choice | None:
    """Import the shared library from `path` (see shared_library); a Choice if it fails."""
    if name in sys.modules:
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return Choice(False, f"Python source: cannot load {path.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        del sys.modules[name]
        return Choice(False, f"Python source: cannot load {path.name}: {err}")
    return None


def status() -> Choice:
    """Which build this process runs (compiled or source), and why."""
    return install()


def running_compiled() -> list[str]:
    """The modules of COMPILED that are loaded as extension modules in this process."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [
        name
        for name in COMPILED
        if (mod := sys.modules.get(name)) is not None
        and str(getattr(mod, "__file__", "")).endswith(suffixes)
    ]
