"""Every response header the plugin writes: RateLimit-Policy / RateLimit, Retry-After, warnings.

Pure functions of an admission Decision, no I/O. draft-ietf-httpapi-ratelimit-headers may still
rename parameters: this is the only module that knows them.

Formats (all Structured Fields, RFC 8941):
  RateLimit-Policy: "requests";q=600;w=60, "concurrent";q=20;qu="concurrent-requests"
  RateLimit: "requests";r=599;t=1, "concurrent";r=19
  Retry-After: 7                          (429 / 402 / 503; integer seconds, >= every exhausted t)
  Creditgate-Warning: "low-balance"       (admitted while the wallet is LOW; an sf-list of
                                            tokens-as-strings, so more warnings can be added)
  Creditgate-Shadow: would-deny="rate-limited"   (shadow route whose rules would have denied)
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

from multidict import istr

from admission.decision import Decision, QuotaDefs, QuotaKind, QuotaStatus

RATELIMIT_POLICY = istr("RateLimit-Policy")
RATELIMIT = istr("RateLimit")
RETRY_AFTER = istr("Retry-After")
WARNING = istr("Creditgate-Warning")
SHADOW = istr("Creditgate-Shadow")

# Parameter names of the draft (-10); change here if the draft renames them.
P_QUOTA = "q"
P_WINDOW = "w"
P_UNIT = "qu"
P_REMAINING = "r"
P_RESET = "t"
UNIT_CONCURRENT = '"concurrent-requests"'

LOW_BALANCE_WARNING = '"low-balance"'

_MAX_CACHED_NAMES = 4096
_quoted_names: dict[str, str] = {}
_shadow_values: dict[str, str] = {}
_policy_items: dict[tuple[str, QuotaKind, int, int], str] = {}


def sf_string(text: str) -> str:
    """An RFC 8941 sf-string: printable ASCII only, with \\ and " escaped.

    Characters outside %x20-7E cannot appear in an sf-string; they become "?" so that a
    strange quota name degrades a header instead of failing the request.
    """
    out = ['"']
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    out.append('"')
    return "".join(out)


def _quoted(name: str) -> str:
    # Quota names come from a small, fixed policy: quoting each once keeps the hot path short.
    q = _quoted_names.get(name)
    if q is None:
        q = sf_string(name)
        if len(_quoted_names) < _MAX_CACHED_NAMES:
            _quoted_names[name] = q
    return q


def policy_item(quota: QuotaStatus) -> str:
    return _policy_item(quota.name, quota.kind, quota.limit, quota.window_seconds)


def _policy_item(name: str, kind: QuotaKind, limit: int, window_seconds: int) -> str:
    # A quota's policy item changes only with its definition: render each definition once.
    key = (name, kind, limit, window_seconds)
    item = _policy_items.get(key)
    if item is None:
        if kind is QuotaKind.CONCURRENCY:
            item = f"{_quoted(name)};{P_QUOTA}={limit};{P_UNIT}={UNIT_CONCURRENT}"
        else:
            item = f"{_quoted(name)};{P_QUOTA}={limit};{P_WINDOW}={window_seconds}"
        if len(_policy_items) < _MAX_CACHED_NAMES:
            _policy_items[key] = item
    return item


def ratelimit_templates(defs: QuotaDefs) -> tuple[str, tuple[str, ...]]:
    """The RateLimit-Policy value for quotas defined as `defs`, and a template of their
    RateLimit value: the text around the figures of admission.decision.Rendered (per quota,
    its remaining count and, rate quotas, its reset seconds, both >= 0), which
    admission.decision.fill_ratelimit puts in. The lease path renders each admission's
    headers with these instead of building QuotaStatus values."""
    policy = ", ".join([_policy_item(*d) for d in defs])
    pieces: list[str] = []
    for name, kind, _, _ in defs:
        pieces.append(f"{', ' if pieces else ''}{_quoted(name)};{P_REMAINING}=")
        if kind is not QuotaKind.CONCURRENCY:
            pieces.append(f";{P_RESET}=")
    pieces.append("")
    return policy, tuple(pieces)


def ratelimit_item(quota: QuotaStatus) -> str:
    remaining = quota.remaining if quota.remaining > 0 else 0
    if quota.kind is QuotaKind.CONCURRENCY:
        # A concurrency slot frees when some request ends: there is no reset time to promise.
        return f"{_quoted(quota.name)};{P_REMAINING}={remaining}"
    reset = quota.reset_seconds if quota.reset_seconds > 0 else 0
    return f"{_quoted(quota.name)};{P_REMAINING}={remaining};{P_RESET}={reset}"


def ratelimit_policy_value(quotas: Iterable[QuotaStatus]) -> str:
    return ", ".join([policy_item(q) for q in quotas])


def ratelimit_value(quotas: Iterable[QuotaStatus]) -> str:
    return ", ".join([ratelimit_item(q) for q in quotas])


def retry_after_seconds(decision: Decision, default_seconds: int = 1) -> int:
    """Seconds a denied caller should wait: the engine's hint, never earlier than the reset
    (t) of any quota the request exhausted, and at least 1."""
    seconds = decision.retry_after_seconds
    if seconds is None:
        seconds = default_seconds
    for q in decision.quotas:
        if q.remaining <= 0 and q.kind is QuotaKind.RATE and q.reset_seconds > seconds:
            seconds = q.reset_seconds
    return seconds if seconds >= 1 else 1


def shadow_value(would_deny: str) -> str:
    v = _shadow_values.get(would_deny)
    if v is None:
        v = _shadow_values[would_deny] = f"would-deny={sf_string(would_deny)}"
    return v


def apply_admitted(headers: MutableMapping[str, str], decision: Decision) -> None:
    """Headers of a response to an admitted request (the handler's own response)."""
    rendered = decision.rendered
    if rendered is not None:  # lease mode: rendered at decision time (same serialization)
        headers[RATELIMIT_POLICY] = rendered.policy
        headers[RATELIMIT] = rendered.ratelimit
    else:
        quotas = decision.quotas
        if quotas:
            headers[RATELIMIT_POLICY] = ratelimit_policy_value(quotas)
            headers[RATELIMIT] = ratelimit_value(quotas)
    if decision.low_balance:
        headers[WARNING] = LOW_BALANCE_WARNING
    if decision.would_deny is not None:
        headers[SHADOW] = shadow_value(decision.would_deny.value)


def apply_denied(
    headers: MutableMapping[str, str], decision: Decision, retry_after: int | None
) -> None:
    """Headers of a denial; retry_after None for denials that waiting does not cure (401/403)."""
    quotas = decision.quotas
    if quotas:
        headers[RATELIMIT_POLICY] = ratelimit_policy_value(quotas)
        headers[RATELIMIT] = ratelimit_value(quotas)
    if retry_after is not None:
        headers[RETRY_AFTER] = str(retry_after)
    if decision.low_balance:
        headers[WARNING] = LOW_BALANCE_WARNING
