"""Human wording of wallets, states, ledger entries, quotas and keys: shared by the CLI, the README
and the gateway, so a state means the same words everywhere. Pure functions, no I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from creditservice.v1 import credit_pb2 as pb

HEALTHY, LOW, GRACE, EXPIRED = 1, 2, 3, 4  # creditservice.v1.WalletState numbers

STATE_NAMES = {0: "UNKNOWN", HEALTHY: "HEALTHY", LOW: "LOW", GRACE: "GRACE", EXPIRED: "EXPIRED"}


def iso(ms: int) -> str:
    """UTC time of ms since the epoch, e.g. 2026-12-01T10:00:00Z."""
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: int) -> str:
    """7d, 36h, 90m or 45s: the largest unit that divides exactly."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def state_meaning(state: int, balance: int, low_threshold: int, grace_until_ms: int) -> str:
    """What a wallet state means for the project's traffic right now, in one line."""
    if state == HEALTHY:
        return "HEALTHY: requests are admitted"
    if state == LOW:
        return (
            "LOW: requests are admitted with a low-balance warning "
            f"(balance {balance} < threshold {low_threshold})"
        )
    if state == GRACE:
        return (
            "GRACE: paid requests are refused with 402 until a top-up; free routes are still "
            f"admitted; expires {iso(grace_until_ms)}; nothing is deleted"
        )
    if state == EXPIRED:
        return (
            f"EXPIRED since {iso(grace_until_ms)}: every request of the project is refused "
            "with 403 until a top-up; nothing is deleted"
        )
    return "UNKNOWN: the authority reported no state"


def wallet_state_line(wallet: pb.Wallet) -> str:
    return state_meaning(
        wallet.state, wallet.balance, wallet.low_balance_threshold, wallet.grace_until_ms
    )


def wallet_text(wallet: pb.Wallet) -> str:
    lines = [
        f"project    {wallet.project_id}  (organization {wallet.organization_id})",
        f"state      {wallet_state_line(wallet)}",
        f"balance    {wallet.balance}  (reserved {wallet.reserved}, available {wallet.available})",
        f"policy     low-balance threshold {wallet.low_balance_threshold}, grace period "
        f"{duration(wallet.grace_period_seconds)}, overdraft {wallet.overdraft_limit}",
        f"version    {wallet.version}  (updated {iso(wallet.updated_at_ms)})",
    ]
    return "\n".join(lines)


def wallet_table(wallets: Sequence[pb.Wallet]) -> str:
    rows = [("PROJECT", "ORGANIZATION", "STATE", "BALANCE", "AVAILABLE")]
    rows += [
        (
            w.project_id,
            w.organization_id,
            STATE_NAMES.get(w.state, str(w.state)),
            str(w.balance),
            str(w.available),
        )
        for w in wallets
    ]
    return _table(rows, numeric=(3, 4))


def ledger_table(entries: Sequence[pb.LedgerEntry]) -> str:
    rows = [("SEQ", "TIME", "KIND", "AMOUNT", "BALANCE", "DETAIL")]
    for e in entries:
        detail = " ".join(
            part
            for part in (
                f"meter={e.meter}" if e.meter else "",
                f"quantity={e.quantity}" if e.quantity else "",
                f"route={e.route}" if e.route else "",
                f"ref={e.reference}" if e.reference else "",
                e.description,
            )
            if part
        )
        rows.append(
            (
                str(e.seq),
                iso(e.created_at_ms),
                pb.EntryKind.Name(e.kind),
                f"{e.amount:+d}",
                str(e.balance_after),
                detail,
            )
        )
    return _table(rows, numeric=(0, 3, 4))


def share(part: int, total: int) -> str:
    """part/total as a percentage with one decimal, in integer arithmetic."""
    if total <= 0:
        return "-"
    tenths = (part * 1000 + total // 2) // total
    return f"{tenths // 10}.{tenths % 10}%"


def usage_text(usage: pb.ExplainUsageResponse, since_ms: int = 0, until_ms: int = 0) -> str:
    """Charges by meter with each meter's share of the total, largest first."""
    start = iso(since_ms) if since_ms else "the start"
    period = f"from {start} to {iso(until_ms) if until_ms else 'now'}"
    project = usage.wallet.project_id or "the project"
    if not usage.meters:
        return f"no usage of {project} {period}"
    rows = [("METER", "AMOUNT", "SHARE", "QUANTITY", "ENTRIES")]
    for m in sorted(usage.meters, key=lambda m: (-m.amount, m.meter)):
        rows.append(
            (
                m.meter,
                str(m.amount),
                share(m.amount, usage.total_amount),
                str(m.quantity),
                str(m.entries),
            )
        )
    total = usage.total_amount
    rows.append(("total", str(total), share(total, total), "", ""))
    return f"usage of {project} by meter, {period}\n" + _table(rows, numeric=(1, 2, 3, 4))


def quota_line(quota: pb.Quota) -> str:
    if quota.algorithm == pb.CONCURRENCY:
        rule = f"at most {quota.limit} in flight (concurrency)"
    else:
        rule = f"{quota.limit} per {duration(quota.window_seconds)} (rate, sliding window)"
    return f"{quota.name}: {rule}"


def quota_table(quotas: Sequence[pb.Quota]) -> str:
    if not quotas:
        return "no quotas"
    return "\n".join(quota_line(q) for q in quotas)


def key_line(key: pb.ApiKey) -> str:
    status = f"revoked {iso(key.revoked_at_ms)}" if key.revoked_at_ms else "active"
    name = f" {key.name!r}" if key.name else ""
    return f"{key.key_id}{name} of project {key.project_id}, prefix {key.prefix}..., {status}"


def _table(rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
