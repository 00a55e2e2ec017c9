"""The small JSON API that `creditgate demo` puts behind the gateway.

It bills nothing itself: the gateway in front holds and commits a fixed cost per route.
"""

from __future__ import annotations

from aiohttp import web

PROJECT_HEADER = "X-Creditgate-Project"


async def hello(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "message": "hello from the sample upstream",
            "project": request.headers.get(PROJECT_HEADER),
        }
    )


async def generate(request: web.Request) -> web.Response:
    prompt = ""
    if request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="expected a JSON body") from None
        if isinstance(body, dict):
            prompt = str(body.get("prompt", ""))
    words = prompt.split() or ["nothing"]
    return web.json_response(
        {
            "text": " ".join(reversed(words)),
            "project": request.headers.get(PROJECT_HEADER),
            "words": len(words),
        }
    )


async def report(request: web.Request) -> web.Response:
    return web.json_response(
        {"report": "quarterly usage", "rows": 0, "project": request.headers.get(PROJECT_HEADER)}
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_sample_upstream() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/hello", hello)
    app.router.add_post("/v1/generate", generate)
    app.router.add_post("/v1/report", report)
    app.router.add_get("/healthz", healthz)
    return app
