"""Export from SQLite, import into PostgreSQL (the migration path): an identical authority.

Also: import needs an empty store, is all-or-nothing, and refuses a tampered stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from creditservice.errors import FailedPrecondition, InvalidArgument, NotFound
from creditservice.storage import Store, open_store, transfer
from creditservice.v1 import credit_pb2 as pb
from tests.test_storage_contract import (
    NOW,
    Backend,
    commit_event,
    make_backend,
    make_wallet,
    new_pid,
    rid,
    spend,
)


@pytest.fixture
async def pg_backend(pg_dsn: str, tmp_path: Path) -> AsyncIterator[Backend]:
    b = make_backend("postgresql", tmp_path, pg_dsn)
    yield b
    await b.drop()


async def stream(records: Iterable[pb.ExportRecord]) -> AsyncIterator[pb.ExportRecord]:
    for r in records:
        yield r


async def export_all(store: Store) -> list[pb.ExportRecord]:
    return [r async for r in store.export()]


@dataclass
class Facts:
    """What `populate` made that the tests look at afterwards."""

    projects: tuple[str, str, str]
    active_reservation: str
    failed: pb.TopUpRequest
    replay: pb.TopUpRequest
    first: pb.TopUpResponse


async def populate(store: Store) -> Facts:
    """A bit of everything the export carries; returns requests to replay later."""
    a = await make_wallet(store, topup=10_000, threshold=500, org="org-a")
    b = await make_wallet(store, topup=300, threshold=100, org="org-b", overdraft=50)
    c = await make_wallet(store, org="org-a")  # never funded: GRACE
    await store.set_quota(
        pb.SetQuotaRequest(
            request_id=rid(),
            quota=pb.Quota(
                project_id=a, name="rpm", algorithm=pb.SLIDING_WINDOW, limit=60, window_seconds=60
            ),
        ),
        NOW,
    )
    await store.set_quota(
        pb.SetQuotaRequest(
            request_id=rid(),
            quota=pb.Quota(project_id=b, name="concurrent", algorithm=pb.CONCURRENCY, limit=4),
        ),
        NOW,
    )
    await store.issue_api_key(
        pb.IssueApiKeyRequest(request_id=rid(), project_id=a, name="live"),
        "key_aaaaaaaaaaaaaaaa",
        "11" * 32,
        "cg_live123",
        NOW,
    )
    await store.issue_api_key(
        pb.IssueApiKeyRequest(request_id=rid(), project_id=b, name="old"),
        "key_bbbbbbbbbbbbbbbb",
        "22" * 32,
        "cg_old4567",
        NOW,
    )
    await store.revoke_api_key(
        pb.RevokeApiKeyRequest(request_id=rid(), key_id="key_bbbbbbbbbbbbbbbb"), NOW + 1
    )
    await store.adjust(
        pb.AdjustRequest(
            request_id=rid(), project_id=a, kind=pb.SLA_CREDIT, amount=25, reason="incident 7"
        ),
        NOW + 2,
    )
    await spend(store, b, 280)  # LOW, then a crossing
    r_active = await store.reserve(
        pb.ReserveRequest(request_id=rid(), project_id=a, amount=100), NOW + 3
    )
    r_done = await store.reserve(
        pb.ReserveRequest(request_id=rid(), project_id=a, amount=40), NOW + 3
    )
    await store.commit(
        pb.CommitRequest(
            request_id=rid(), reservation_id=r_done.reservation.reservation_id, amount=35
        ),
        NOW + 4,
    )
    r_rel = await store.reserve(
        pb.ReserveRequest(request_id=rid(), project_id=b, amount=10), NOW + 3
    )
    await store.release(
        pb.ReleaseRequest(request_id=rid(), reservation_id=r_rel.reservation.reservation_id),
        NOW + 4,
    )
    events = [commit_event(f"ev-{i}", a if i % 2 else b, i) for i in range(1, 60)]
    events.append(commit_event("ev-ghost", new_pid(), 5))
    events.append(
        pb.SettlementEvent(event_id="ev-rel", kind=pb.RELEASE, project_id=a, held_amount=9)
    )
    await store.settle(events, NOW + 5)
    failed = pb.TopUpRequest(request_id=rid(), project_id=new_pid(), amount=1)
    with pytest.raises(NotFound):
        await store.top_up(failed, NOW + 6)
    replay = pb.TopUpRequest(request_id=rid(), project_id=c, amount=7, reference="pay-9")
    first = await store.top_up(replay, NOW + 7)
    return Facts(
        projects=(a, b, c),
        active_reservation=r_active.reservation.reservation_id,
        failed=failed,
        replay=replay,
        first=first,
    )


async def test_sqlite_export_imports_into_postgresql_identically(
    tmp_path: Path, pg_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "CHUNK", 7)  # many keyset pages, composite keys included
    src = await open_store(f"sqlite:///{tmp_path}/source.db")
    dst = await open_store(pg_backend.url)
    try:
        facts = await populate(src)
        exported = await export_all(src)
        kinds = [r.WhichOneof("record") for r in exported]
        assert kinds[0] == "header" and kinds[-1] == "trailer"
        order = [
            "wallet",
            "quota",
            "api_key",
            "reservation",
            "entry",
            "applied_event",
            "idempotency",
        ]
        body = [str(k) for k in kinds[1:-1]]
        assert body == sorted(body, key=order.index)  # sections in the documented order
        assert set(body) == set(order)
        trailer = exported[-1].trailer
        assert trailer.records == len(exported) - 1

        result = await dst.import_records(stream(exported))
        assert (result.records, result.wallets, result.digest) == (
            trailer.records,
            3,
            trailer.digest,
        )
        assert result.ledger_entries == trailer.ledger_entries

        again = await export_all(dst)
        assert again[0].header.source_backend == "postgresql"
        assert again[1:-1] == exported[1:-1]  # wallets, ledger seqs, keys, events, records
        t2 = again[-1].trailer
        assert (t2.records, t2.ledger_entries, t2.ledger_sum) == (
            trailer.records,
            trailer.ledger_entries,
            trailer.ledger_sum,
        )
        assert await src.verify() == [] and await dst.verify() == []

        a, b, c = facts.projects
        for pid in (a, b, c):
            assert await dst.get_wallet(pid) == await src.get_wallet(pid)
            assert await dst.list_transactions(pid, 1000, "") == await src.list_transactions(
                pid, 1000, ""
            )
            assert await dst.list_quotas(pid) == await src.list_quotas(pid)
        assert await dst.resolve_api_key("22" * 32) == await src.resolve_api_key("22" * 32)
        active = facts.active_reservation
        assert await dst.get_reservation(active) == await src.get_reservation(active)

        # Idempotency records came along: replays answer as the source did, failures included.
        assert await dst.top_up(facts.replay, NOW + 100) == facts.first
        with pytest.raises(NotFound):
            await dst.top_up(facts.failed, NOW + 100)
        dup = await dst.settle([commit_event("ev-3", a, 3)], NOW + 100)
        src_dup = await src.settle([commit_event("ev-3", a, 3)], NOW + 100)
        assert dup.results == src_dup.results and dup.results[0].status == pb.DUPLICATE
        rejected = await dst.settle([commit_event("ev-ghost", new_pid(), 5)], NOW + 100)
        assert rejected.results[0].status == pb.REJECTED

        # Seqs continue above the imported maximum.
        max_seq = max(r.entry.seq for r in exported if r.HasField("entry"))
        top = await dst.top_up(pb.TopUpRequest(request_id=rid(), project_id=a, amount=1), NOW + 200)
        assert top.entry.seq == max_seq + 1
        assert await dst.verify() == []

        with pytest.raises(FailedPrecondition, match="empty"):
            await dst.import_records(stream(exported))
        assert await dst.verify() == []
    finally:
        await src.close()
        await dst.close()


async def test_tampered_or_broken_streams_are_refused_with_nothing_written(
    tmp_path: Path, pg_backend: Backend
) -> None:
    src = await open_store(f"sqlite:///{tmp_path}/source.db")
    dst = await open_store(pg_backend.url)
    try:
        await populate(src)
        exported = await export_all(src)

        tampered = [pb.ExportRecord() for _ in exported]
        for t, r in zip(tampered, exported, strict=True):
            t.CopyFrom(r)
        entry = next(t for t in tampered if t.HasField("entry") and t.entry.amount < 0)
        entry.entry.amount -= 1  # the trailer's sum and digest no longer match
        broken = {
            "tampered": tampered,
            "no trailer": exported[:-1],
            "no header": exported[1:],
            "after trailer": [*exported, exported[1]],
            "two headers": [exported[0], *exported],
        }
        for name, records in broken.items():
            with pytest.raises(InvalidArgument):
                await dst.import_records(stream(records))
            assert [r.WhichOneof("record") for r in await export_all(dst)] == [
                "header",
                "trailer",
            ], name

        digest_only = [pb.ExportRecord() for _ in exported]
        for t, r in zip(digest_only, exported, strict=True):
            t.CopyFrom(r)
        digest_only[-1].trailer.digest = "0" * 64
        with pytest.raises(InvalidArgument, match="digest"):
            await dst.import_records(stream(digest_only))

        result = await dst.import_records(stream(exported))
        assert result.records == exported[-1].trailer.records
        assert await dst.verify() == []
    finally:
        await src.close()
        await dst.close()


def _resealed(records: list[pb.ExportRecord]) -> list[pb.ExportRecord]:
    """`records` with a trailer recomputed for them, as anyone editing an export can."""
    digest = transfer.Digest()
    for r in records[:-1]:
        digest.add(r)
    return [*records[:-1], pb.ExportRecord(trailer=digest.trailer())]


@pytest.mark.parametrize("destination", ["sqlite", "postgresql"])
async def test_a_resealed_stream_that_contradicts_its_ledger_is_refused(
    tmp_path: Path, pg_dsn: str, destination: str
) -> None:
    """The digest shows the stream is whole, not that it is right: a wallet balance that
    is not its ledger's sum, or an entry of the wrong sign, would create money. The import
    checks what verify() checks before it commits, and writes nothing."""
    src = await open_store(f"sqlite:///{tmp_path}/source.db")
    backend = make_backend(destination, tmp_path, pg_dsn)
    dst = await open_store(backend.url)
    try:
        await populate(src)
        exported = await export_all(src)

        def edited(change: str) -> list[pb.ExportRecord]:
            out = [pb.ExportRecord() for _ in exported]
            for t, r in zip(out, exported, strict=True):
                t.CopyFrom(r)
            if change == "balance":
                next(t for t in out if t.HasField("wallet")).wallet.balance += 10**12
            elif change == "beyond":  # consistent, but past what the gateways compute exactly
                wallet = next(t for t in out if t.HasField("wallet")).wallet
                entry = next(
                    t.entry
                    for t in out
                    if t.HasField("entry") and t.entry.project_id == wallet.project_id
                )
                wallet.balance += 6 * 10**15
                for t in out:
                    if t.HasField("entry") and t.entry.project_id == wallet.project_id:
                        t.entry.balance_after += 6 * 10**15
                entry.amount += 6 * 10**15
            else:  # a top-up of the wrong sign, its balances made to agree
                entry = next(t.entry for t in out if t.HasField("entry") and t.entry.amount > 0)
                entry.amount = -entry.amount
            return _resealed(out)

        for change, problem in (
            ("balance", "ledger sum"),
            ("sign", "running sum"),
            ("beyond", "beyond the maximum"),
        ):
            with pytest.raises(InvalidArgument, match=f"contradicts itself.*{problem}"):
                await dst.import_records(stream(edited(change)))
            assert [r.WhichOneof("record") for r in await export_all(dst)] == [
                "header",
                "trailer",
            ], change
        assert (await dst.import_records(stream(exported))).records == len(exported) - 1
    finally:
        await src.close()
        await dst.close()
        await backend.drop()


async def test_postgresql_export_round_trips_into_sqlite(
    tmp_path: Path, pg_backend: Backend
) -> None:
    src = await open_store(pg_backend.url)
    dst = await open_store(f"sqlite:///{tmp_path}/copy.db")
    try:
        await populate(src)
        exported = await export_all(src)
        await dst.import_records(stream(exported))
        again = await export_all(dst)
        assert again[1:-1] == exported[1:-1]
        assert again[-1].trailer.digest != "" and await dst.verify() == []
    finally:
        await src.close()
        await dst.close()
