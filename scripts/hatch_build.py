"""The package's build hook: compile the hot path with mypyc (hatch-mypyc), or, when that
fails (no C compiler, no Python headers), build the plain Python package with a warning.

creditgate then runs its Python source, slower (admission/native.py says which build runs;
`creditgate demo` prints it). CREDITGATE_REQUIRE_COMPILED=1 makes a failed compile fail the
build instead (CI sets it).
"""

from __future__ import annotations

import os
from typing import Any

from hatch_mypyc.plugin import MypycBuildHook


class CompiledOrPlain(MypycBuildHook):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        try:
            super().initialize(version, build_data)
        except Exception as err:
            if os.environ.get("CREDITGATE_REQUIRE_COMPILED", "") not in ("", "0"):
                raise
            self.clean([version])  # nothing half-built stays beside the sources
            last_line = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
            self.app.display_warning(
                "creditgate: compiling the hot path with mypyc failed; building the plain "
                f"Python package instead (slower). Last line: {last_line}"
            )


def get_build_hook() -> type[MypycBuildHook]:
    return CompiledOrPlain
