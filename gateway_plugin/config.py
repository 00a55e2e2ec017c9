"""GatewayConfig: the one object that configures the plugin, with documented defaults.

Build it in code, from environment variables (`GatewayConfig.from_env`) or a TOML file
(`GatewayConfig.from_toml`); `setup(app, config)` takes it as is.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from admission.keys import check_gateway_id

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from admission.policy import Policy

ENV_PREFIX = "CREDITGATE_"
DEFAULT_PROBLEM_TYPE_BASE = "urn:creditgate:problem:"


def default_gateway_id() -> str:
    """hostname-pid: unique per process, stable for its lifetime, readable in outbox events."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(slots=True)
class GatewayConfig:
    """Everything `setup()` needs. Only `policy` has no usable default.

    Addresses follow the team conventions: Redis on 127.0.0.1:6379, the authority's gRPC on
    127.0.0.1:50051 authenticated with the admin token.
    """

    # A parsed admission.policy.Policy, or the path of a policy file (loaded by setup()).
    policy: Policy | str | Path | None = None
    # Redis shared by every gateway process; redis_cluster=True treats the URL as one seed node.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    # The authority (creditservice) gRPC target and the admin token gateways present to it.
    authority_target: str = "127.0.0.1:50051"
    authority_token: str = ""
    # Written into every outbox event (field g); default hostname-pid.
    gateway_id: str = field(default_factory=default_gateway_id)
    # Peers (IPs or CIDRs) whose forwarded project id / client address headers are trusted
    # (invariant 8: empty means no client-supplied project id is ever trusted).
    trusted_proxies: tuple[str, ...] = ()
    # Background work in this process. Turn the flusher off when a separate `creditgate flusher`
    # process settles the outbox; turn watch off only in tests that drive the cache by hand.
    run_flusher: bool = True
    run_watch: bool = True
    run_sweeper: bool = True
    sweep_interval_seconds: float = 1.0
    # With run_watch: how often cached wallets/quotas are compared with the authority (0 = never).
    reconcile_interval_seconds: float = 60.0
    # On shutdown: how long the flusher may take to settle what is in the outbox.
    flusher_drain_timeout_seconds: float = 10.0
    # On shutdown: how long commits/releases still in flight may take.
    settle_drain_timeout_seconds: float = 10.0
    # Path of the Prometheus endpoint on the app given to setup(); "" serves no endpoint.
    metrics_path: str = "/metrics"
    # RFC 9457 `type` = base + Reason value, e.g. urn:creditgate:problem:rate-limited.
    problem_type_base: str = DEFAULT_PROBLEM_TYPE_BASE
    # Per-project metric series exist only for these projects ...
    metrics_projects: tuple[str, ...] = ()
    # ... plus the N projects with the most decisions (0 = none): a bound on cardinality.
    metrics_top_projects: int = 0
    # Registry for this plugin's metrics; None = prometheus_client's global REGISTRY.
    # Tests pass their own so that several apps in one process do not collide.
    registry: CollectorRegistry | None = None

    def __post_init__(self) -> None:
        if self.sweep_interval_seconds <= 0:
            raise ValueError("sweep_interval_seconds must be > 0")
        if self.metrics_path and not self.metrics_path.startswith("/"):
            raise ValueError(f"metrics_path must start with '/': {self.metrics_path!r}")
        if self.metrics_top_projects < 0:
            raise ValueError("metrics_top_projects must be >= 0")
        check_gateway_id(self.gateway_id)
        self.trusted_proxies = tuple(self.trusted_proxies)
        self.metrics_projects = tuple(self.metrics_projects)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GatewayConfig:
        """Build from plain values (TOML table, parsed env); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known or key == "registry":
                raise ConfigError(f"unknown gateway setting {key!r}", key)
            try:
                kwargs[key] = _coerce(key, known[key].type, raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc), key) from None
        try:
            return cls(**kwargs)
        except ValueError as exc:  # __post_init__: its messages start with the field's name
            first = str(exc).split(" ", 1)[0].rstrip(":")
            raise ConfigError(str(exc), first if first in known else None) from None

    @classmethod
    def from_toml(cls, path: str | Path, table: str = "gateway") -> GatewayConfig:
        """Read the `[gateway]` table of a TOML file; a relative policy path is file-relative.
        Errors name the file, and the line of the setting at fault."""
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        values = dict(data.get(table, {}))
        if "policy" in values:
            policy = Path(str(values["policy"]))
            values["policy"] = policy if policy.is_absolute() else p.parent / policy
        try:
            return cls.from_mapping(values)
        except ConfigError as exc:
            line = _line_of(text, table, exc.key) if exc.key else None
            where = f"{p}:{line}" if line else str(p)
            key = f"{table}.{exc.key}: " if exc.key else ""
            raise ConfigError(f"{where}: {key}{exc}", exc.key) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        """CREDITGATE_<FIELD> variables, e.g. CREDITGATE_REDIS_URL, CREDITGATE_POLICY.

        CREDITGATE_ADMIN_TOKEN is used as authority_token when CREDITGATE_AUTHORITY_TOKEN is
        not set (the admin token is what gateways present to the authority).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "registry":
                continue
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = raw
        if "authority_token" not in values and ENV_PREFIX + "ADMIN_TOKEN" in env:
            values["authority_token"] = env[ENV_PREFIX + "ADMIN_TOKEN"]
        try:
            return cls.from_mapping(values)
        except ConfigError as exc:
            name = f"{ENV_PREFIX}{exc.key.upper()}: " if exc.key else ""
            raise ConfigError(f"{name}{exc}", exc.key) from None


class ConfigError(ValueError):
    """A gateway setting that cannot be used; `key` names it when one setting is at fault."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _line_of(text: str, table: str, key: str) -> int | None:
    """The line (1-based) of `key = ...` inside `[table]` of a TOML text, if written there."""
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped.strip("[]").strip()
        elif current == table and stripped.split("=", 1)[0].strip().strip('"') == key:
            return number
    return None


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _coerce(name: str, annotation: Any, raw: Any) -> Any:
    """Strings from env/TOML to the field's type; annotations are strings (postponed)."""
    kind = str(annotation)
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{name}: expected a boolean, got {raw!r}")
    if kind == "int":
        if isinstance(raw, bool):
            raise ValueError(f"{name}: expected an integer, got {raw!r}")
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind.startswith("tuple"):
        if isinstance(raw, str):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return tuple(str(v) for v in raw)
    if name == "policy":
        return raw if not isinstance(raw, str) else Path(raw)
    return str(raw)
