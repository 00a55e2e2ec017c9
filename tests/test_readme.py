"""The README's plugin example and policy file, run as a user would copy them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2_grpc as pb_grpc
from gateway_plugin.plugin import GATEWAY_KEY
from tests.fixtures_gateway import Gateway, ProjectFactory, bearer, usage_sum
from tests.services import RedisProcess

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(section: str, lang: str) -> str:
    """The first ```lang block under the README heading `## section`."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"no {lang} block in README section {section!r}"
    return match.group(1)


def _replace_once(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"the README example no longer contains {old!r} once"
    return code.replace(old, new)


async def test_plugin_example_with_the_reference_policy(
    tmp_path: Path,
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    gateway_redis: RedisProcess,
    project_factory: ProjectFactory,
    aiohttp_client: Any,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(_block("Policy file reference", "toml"), encoding="utf-8")
    code = _block("Using the plugin in an aiohttp app", "python")
    # Only the addresses, the credential and the serving differ from what a user runs.
    code = _replace_once(code, '"policy.toml"', repr(str(policy)))
    code = _replace_once(code, '"redis://127.0.0.1:6379/0"', repr(gateway_redis.url))
    code = _replace_once(code, '"127.0.0.1:50051"', repr(authority.grpc_target))
    code = _replace_once(code, '"…"', repr(authority.config.admin_token))
    code = _replace_once(code, "GatewayConfig(\n", "GatewayConfig(\n        registry=_registry,\n")
    code = _replace_once(code, "web.run_app(app, port=8080)\n", "")
    namespace: dict[str, Any] = {"_registry": CollectorRegistry()}
    exec(compile(code, str(README), "exec"), namespace)
    app: web.Application = namespace["app"]

    client = await aiohttp_client(app)
    gateway = Gateway(client, app[GATEWAY_KEY], namespace["_registry"])
    project, secret = await project_factory(1000)
    resp = await client.post("/v1/chat", headers=bearer(secret))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"ok": True}
    assert "RateLimit" in resp.headers
    await gateway.settle_everything()
    assert await usage_sum(authority_stub, authority.config.admin_token, project) == (7, 1)
