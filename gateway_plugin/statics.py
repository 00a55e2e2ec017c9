"""The file an aiohttp static route serves, as the policy path it is metered under.

aiohttp's StaticResource reads its URL its own way: it decodes %2F, lets pathlib drop a
trailing "/" or ".", and resolves ".." on disk, after following symlinks. No reading of the
URL's text predicts that, so a request routed to a static resource is matched against the
policy as `<prefix>/<the served file, relative to the directory>`. Mirrors
StaticResource._handle and _resolve_path_to_response (aiohttp 3.14).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web


def static_routes(app: web.Application) -> Iterator[tuple[Callable[..., Any], web.StaticResource]]:
    """(route handler, its StaticResource) for every static route of `app` and its sub-apps."""
    for resource in app.router.resources():
        if isinstance(resource, web.StaticResource):
            for route in resource:
                yield route.handler, resource
            continue
        sub = resource.get_info().get("app")
        if isinstance(sub, web.Application):
            yield from static_routes(sub)


def served_path(resource: web.StaticResource, filename: str) -> str | None:
    """`<prefix>/<relative path>` of what `resource` serves for the match_info `filename`
    (a file or a directory), or None when it answers 404 (outside its directory, absolute)."""
    info = resource.get_info()
    directory: Path = info["directory"]
    prefix: str = info["prefix"]
    if Path(filename).is_absolute():
        return None
    unresolved = directory.joinpath(filename)
    try:
        if getattr(resource, "_follow_symlinks", False):
            # aiohttp checks the text path here, then serves wherever symlinks lead.
            served = Path(os.path.normpath(unresolved))
        else:
            served = unresolved.resolve()
        relative = served.relative_to(directory).as_posix()
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop (< 3.13)
        return None
    return f"{prefix}/" if relative == "." else f"{prefix}/{relative}"


async def served_path_async(resource: web.StaticResource, filename: str) -> str | None:
    """served_path off the event loop: resolving touches the disk (aiohttp does it so too)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, served_path, resource, filename)
