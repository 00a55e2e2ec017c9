"""creditgate for aiohttp: admission (quotas + credit holds) as one `setup(app, config)` call.

Public API (stable; the standalone gateway, demo and dashboard build on it):

    from gateway_plugin import GatewayConfig, setup, usage, GATEWAY_KEY

    setup(app: web.Application, config: GatewayConfig) -> GatewayState
        Before the app starts. Installs admission around every route's handler (wrapped when
        the app starts; not a middleware), the on_response_prepare header hook,
        the lifecycle (cleanup_ctx: Redis, AuthorityClient, CacheFiller, IdentityResolver,
        AdmissionEngine, Watch, Flusher, sweeper) and GET config.metrics_path. On a sub-app it
        protects only that sub-app's routes. Raises RuntimeError once the app is frozen.

    GatewayConfig(policy=Policy | path, redis_url=..., redis_cluster=False,
                  authority_target="127.0.0.1:50051", authority_token="", gateway_id=<host-pid>,
                  trusted_proxies=(), run_flusher=True, run_watch=True, run_sweeper=True,
                  sweep_interval_seconds=1.0, reconcile_interval_seconds=60.0,
                  flusher_drain_timeout_seconds=10.0,
                  settle_drain_timeout_seconds=10.0, metrics_path="/metrics",
                  problem_type_base="urn:creditgate:problem:", metrics_projects=(),
                  metrics_top_projects=0, registry=None)
        GatewayConfig.from_env() (CREDITGATE_<FIELD>), GatewayConfig.from_toml(path, "gateway").
        Metrics go to `registry` (default: the global one); apps sharing a registry share one
        GatewayMetrics (the first setup()'s per-project allow-list / top-N applies).

    usage(request) -> UsageHandle           (inside a handler of an admitted request)
        .report(amount: int)  commit this instead of the hold (<= hold unless overage route)
        .release()            end the hold with no charge
        .project_id, .hold, .hold_amount, .decision, .reported
        Misuse raises UsageError (a ValueError) at the call.

    app[GATEWAY_KEY] / request.config_dict[GATEWAY_KEY] -> GatewayState
        .config, .policy, .metrics (GatewayMetrics), and once started: .redis, .authority,
        .filler, .identity, .engine, .watch, .flusher; .started (asyncio.Event);
        await .wait_settled(within_s) waits for commits/releases in flight;
        .exempt_handlers: route handlers served without admission (add before start).

Responses: denials are application/problem+json (gateway_plugin.problems); headers
(RateLimit-Policy, RateLimit, Retry-After, Creditgate-Warning, Creditgate-Shadow) are defined
in gateway_plugin.headers only.
"""

from __future__ import annotations

import admission  # noqa: F401 - first: it picks the hot path's build (admission.native)
from gateway_plugin.config import GatewayConfig
from gateway_plugin.handle import USAGE_KEY, UsageError, UsageHandle, usage
from gateway_plugin.plugin import GATEWAY_KEY, GatewayState, setup

__all__ = [
    "GATEWAY_KEY",
    "USAGE_KEY",
    "GatewayConfig",
    "GatewayState",
    "UsageError",
    "UsageHandle",
    "setup",
    "usage",
]
