"""SettlementEvent.quantity (LEASE.md "Outbox entry field n"): from the outbox entry's `n`
through the flusher and Settle to the ledger's `quantity`, on SQLite and PostgreSQL.

Quantity is the number of requests an event stands for (a lease sync aggregates many commits
into one event). 0 or missing means 1; a negative one is refused with nothing written; a
replayed event keeps its first quantity.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from admission import keys
from admission.flusher import Flusher, parse_entry
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from creditservice.validation import MAX_QUANTITY
from gateway_plugin.cli import main as cli_main
from tests.fixtures_admission import authority_client_for
from tests.fixtures_authority import (
    admin_md,
    authority_state,
    credit_stub,
    expect_rpc_error,
    make_wallet,
    new_project_id,
)

if TYPE_CHECKING:
    from creditservice.v1.credit_pb2_grpc import CreditServiceAsyncStub as Stub

SHARDS = 16
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(params=["sqlite", "postgresql"])
def srv(request: pytest.FixtureRequest) -> AuthorityServer:
    # Sync on purpose: the session's pg_dsn fixture must not start inside a running loop.
    name = "authority" if request.param == "sqlite" else "authority_pg"
    server: AuthorityServer = request.getfixturevalue(name)
    return server


def commit(eid: str, pid: str, amount: int, **kw: Any) -> pb.SettlementEvent:
    return pb.SettlementEvent(
        event_id=eid,
        kind=pb.COMMIT,
        project_id=pid,
        hold_id=eid,
        held_amount=amount,
        amount=amount,
        meter="requests",
        route="POST /v1/chat",
        gateway_id="gw-q",
        **kw,
    )


async def usage_entries(stub: Stub, md: Any, pid: str) -> dict[str, pb.LedgerEntry]:
    """The project's USAGE ledger entries by reference (the event id), every page."""
    out: dict[str, pb.LedgerEntry] = {}
    token = ""
    while True:
        page = await stub.ListTransactions(
            pb.ListTransactionsRequest(project_id=pid, page_size=1000, page_token=token),
            metadata=md,
        )
        out.update({e.reference: e for e in page.entries if e.kind == pb.USAGE})
        token = page.next_page_token
        if not token:
            return out


async def usage_by_meter(stub: Stub, md: Any, pid: str) -> dict[str, tuple[int, int, int]]:
    """ExplainUsage over all time: meter -> (amount, quantity, entries)."""
    resp = await stub.ExplainUsage(pb.ExplainUsageRequest(project_id=pid), metadata=md)
    return {m.meter: (m.amount, m.quantity, m.entries) for m in resp.meters}


# ---------------------------------------------------------------- authority over gRPC


async def test_quantity_is_stored_listed_and_explained(
    srv: AuthorityServer, capsys: pytest.CaptureFixture[str]
) -> None:
    token = srv.config.admin_token
    md = admin_md(token)
    async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
        stub = credit_stub(ch)
        pid = new_project_id("q")
        await make_wallet(stub, token, pid, balance=10_000)
        resp = await stub.Settle(
            pb.SettleRequest(
                events=[
                    commit("q37", pid, 370, quantity=37),
                    commit("q0", pid, 5, quantity=0),  # 0 means 1
                    commit("qnone", pid, 6),  # unset (an older gateway): 1
                    commit("qfree", pid, 0, quantity=4),  # free: no ledger entry
                    pb.SettlementEvent(
                        event_id="rel", kind=pb.RELEASE, project_id=pid, held_amount=9, quantity=1
                    ),
                    pb.SettlementEvent(  # a lease's EXPIRE event: n = 0, no usage
                        event_id="Lq1.x", kind=pb.EXPIRE, project_id=pid, held_amount=50
                    ),
                ]
            ),
            metadata=md,
        )
        assert [r.status for r in resp.results] == [pb.APPLIED] * 6
        assert resp.wallets[0].balance == 10_000 - 381

        entries = await usage_entries(stub, md, pid)
        assert {ref: (e.quantity, -e.amount) for ref, e in entries.items()} == {
            "q37": (37, 370),
            "q0": (1, 5),
            "qnone": (1, 6),
        }
        assert entries["q37"].seq == resp.results[0].ledger_seq
        assert entries["q37"].route == "POST /v1/chat"
        assert await usage_by_meter(stub, md, pid) == {"requests": (381, 39, 3)}

    # The REST twin carries the field (built from the same descriptors).
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{srv.http_url}/v1/settle",
            json={
                "events": [
                    {
                        "event_id": "rest12",
                        "kind": "COMMIT",
                        "project_id": pid,
                        "held_amount": 12,
                        "amount": 12,
                        "quantity": "12",
                    }
                ]
            },
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["results"][0]["status"] == "APPLIED"
        async with session.get(
            f"{srv.http_url}/v1/wallets/{pid}/transactions",
            headers={"Authorization": f"Bearer {token}"},
        ) as r:
            listed = (await r.json())["entries"]
    assert {e["reference"]: e["quantity"] for e in listed if e["kind"] == "USAGE"} == {
        "rest12": "12",
        "q37": "37",
        "q0": "1",
        "qnone": "1",
    }

    # `creditgate wallet transactions` shows it.
    capsys.readouterr()
    argv = ["wallet", "transactions", pid, "--authority", srv.grpc_target, "--token", token]
    code = await asyncio.to_thread(cli_main, argv)
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    line = next(x for x in out.splitlines() if "ref=q37" in x)
    assert "-370" in line and "quantity=37" in line and "route=POST /v1/chat" in line


async def test_negative_quantity_is_refused_and_nothing_is_written(srv: AuthorityServer) -> None:
    token = srv.config.admin_token
    md = admin_md(token)
    async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
        stub = credit_stub(ch)
        pid = new_project_id("q")
        await make_wallet(stub, token, pid, balance=1_000)
        for bad, words in (
            (commit("neg", pid, 10, quantity=-1), ("events[1].quantity", ">= 0", "-1")),
            (commit("big", pid, 10, quantity=MAX_QUANTITY + 1), ("events[1].quantity", "<=")),
        ):
            before = await authority_state(srv)
            batch = pb.SettleRequest(events=[commit("fine", pid, 7, quantity=2), bad])
            await expect_rpc_error(stub.Settle(batch, metadata=md), INVALID, *words)
            assert await authority_state(srv) == before
        assert await usage_entries(stub, md, pid) == {}

        # A RELEASE or EXPIRE is held to the same rule.
        release = pb.SettlementEvent(
            event_id="rel-neg", kind=pb.RELEASE, project_id=pid, held_amount=3, quantity=-5
        )
        await expect_rpc_error(
            stub.Settle(pb.SettleRequest(events=[release]), metadata=md),
            INVALID,
            "events[0].quantity",
        )

        # Nothing of the refused batches was recorded: the fine event applies now, once.
        resp = await stub.Settle(
            pb.SettleRequest(events=[commit("fine", pid, 7, quantity=2)]), metadata=md
        )
        assert resp.results[0].status == pb.APPLIED
        assert resp.wallets[0].balance == 1_000 - 7
        assert {r: e.quantity for r, e in (await usage_entries(stub, md, pid)).items()} == {
            "fine": 2
        }


async def test_replay_keeps_the_first_quantity(srv: AuthorityServer) -> None:
    token = srv.config.admin_token
    md = admin_md(token)
    async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
        stub = credit_stub(ch)
        pid = new_project_id("q")
        await make_wallet(stub, token, pid, balance=1_000)
        first = await stub.Settle(
            pb.SettleRequest(events=[commit("r37", pid, 37, quantity=37)]), metadata=md
        )
        assert first.results[0].status == pb.APPLIED
        seq = first.results[0].ledger_seq
        state = await authority_state(srv)

        for quantity in (37, 99, 0):
            again = await stub.Settle(
                pb.SettleRequest(events=[commit("r37", pid, 37, quantity=quantity)]), metadata=md
            )
            assert (again.results[0].status, again.results[0].ledger_seq) == (pb.DUPLICATE, seq)
            # The wallet as it stands (for the gateway's ack), not a new version of it.
            assert [w.balance for w in again.wallets] == [1_000 - 37]
            assert again.wallets[0].version == first.wallets[0].version
        assert await authority_state(srv) == state
        entries = await usage_entries(stub, md, pid)
        assert [(e.seq, e.quantity, e.amount) for e in entries.values()] == [(seq, 37, -37)]


# ---------------------------------------------------------------- flusher end to end


def outbox_fields(
    eid: str, kind: str, pid: str, hold: str, held: int, amount: int
) -> dict[str, str]:
    """An outbox entry's fields exactly as settle.lua writes them (lease.lua adds `n`)."""
    return {
        keys.E_EVENT_ID: eid,
        keys.E_KIND: kind,
        keys.E_PROJECT: pid,
        keys.E_HOLD_ID: hold,
        keys.E_HELD: str(held),
        keys.E_AMOUNT: str(amount),
        keys.E_METER: "requests",
        keys.E_ROUTE: "chat",
        keys.E_TIME_MS: "1767225600000",
        keys.E_GATEWAY: "gw-q",
    }


async def test_flusher_carries_n_to_the_ledger(
    srv: AuthorityServer, rclient: aioredis.Redis, registry: CollectorRegistry
) -> None:
    token = srv.config.admin_token
    md = admin_md(token)
    pid = new_project_id("q")
    shard = keys.shard_of(pid, SHARDS)
    lease = "Lq7x9"
    async with grpc.aio.insecure_channel(srv.grpc_target) as ch:
        stub = credit_stub(ch)
        await make_wallet(stub, token, pid, balance=10_000)
        # The cached wallet as the scripts left it: the two commits are unsettled.
        await rclient.hset(
            keys.wallet(shard, pid),
            mapping={
                keys.W_SNAPSHOT: 10_000,
                keys.W_VERSION: 1,
                keys.W_STATE: pb.HEALTHY,
                keys.W_LOW_THRESHOLD: 0,
                keys.W_OVERDRAFT: 0,
                keys.W_GRACE_UNTIL: 0,
                keys.W_HELD: 0,
                keys.W_UNSETTLED: 370 + 6,
                keys.W_UNSETTLED_LIMIT: 1_000_000,
            },
        )
        stream = keys.outbox(shard)
        # A lease sync's aggregated commit of 37 requests, a hold's commit (no `n`), and the
        # lease's EXPIRE (n = 0).
        sync = outbox_fields(f"{lease}.1.0", "COMMIT", pid, lease, 370, 370) | {
            keys.E_QUANTITY: "37"
        }
        await rclient.xadd(stream, sync)  # type: ignore[arg-type]
        hold = outbox_fields("0f3a9c", "COMMIT", pid, "0f3a9c", 10, 6)
        await rclient.xadd(stream, hold)  # type: ignore[arg-type]
        expire = outbox_fields(f"{lease}.x", "EXPIRE", pid, lease, 120, 0) | {keys.E_QUANTITY: "0"}
        await rclient.xadd(stream, expire)  # type: ignore[arg-type]

        async with authority_client_for(srv) as client:
            flusher = Flusher(
                rclient, client, shards=SHARDS, gateway_id="flusher-q", registry=registry
            )
            settled = 0
            while (n := await flusher.flush_once()) > 0:
                settled += n
        assert settled == 3
        assert (
            registry.get_sample_value("creditgate_settle_events_total", {"status": "applied"}) == 3
        )

        entries = await usage_entries(stub, md, pid)
        assert {ref: (e.quantity, -e.amount) for ref, e in entries.items()} == {
            f"{lease}.1.0": (37, 370),
            "0f3a9c": (1, 6),
        }
        assert await usage_by_meter(stub, md, pid) == {"requests": (376, 38, 2)}
    pending = await rclient.xpending(stream, keys.OUTBOX_GROUP)
    assert pending["pending"] == 0
    cached = await rclient.hgetall(keys.wallet(shard, pid))
    assert int(cached[keys.W_UNSETTLED.encode()]) == 0
    assert int(cached[keys.W_SNAPSHOT.encode()]) == 10_000 - 376


def test_parse_entry_reads_n() -> None:
    def parsed(kind: str, amount: int, **extra: str) -> pb.SettlementEvent:
        fields = outbox_fields("e1", kind, "p-1", "e1", 10, amount) | extra
        raw = {k.encode(): v.encode() for k, v in fields.items()}
        return parse_entry(3, "1-0", raw).event

    assert keys.E_QUANTITY == "n"
    assert parsed("COMMIT", 10).quantity == 1  # a hold's event: no `n`
    assert parsed("COMMIT", 10, n="37").quantity == 37
    assert parsed("EXPIRE", 0, n="0").quantity == 0  # kept as written, not raised to 1
    assert parsed("RELEASE", 0, n="0").quantity == 0
    assert parsed("RELEASE", 0).quantity == 1
    with pytest.raises(ValueError):
        parsed("COMMIT", 10, n="many")  # malformed: the flusher leaves it pending as poison
