"""IdentityResolver against a real Redis and a real authority: every outcome, trust, revocation."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from admission import keys
from admission.authority import AuthorityClient, AuthorityClientConfig, AuthorityRequestFailed
from admission.cache import CacheFiller, WatchSubscriber
from admission.decision import Reason
from admission.errors import AuthorityUnavailable
from admission.identity import Identity, IdentityConfig, IdentityResolver, key_hash
from admission.ports import CredentialResolver, SnapshotFiller
from creditservice.server import AuthorityServer
from creditservice.v1 import credit_pb2 as pb
from creditservice.v1 import credit_pb2_grpc as pb_grpc
from tests.fixtures_authority import admin_md, make_wallet, new_project_id
from tests.services import free_port
from tests.test_cache_watch import eventually
from tests.test_flusher import SHARDS

TRUSTED = ("10.0.0.0/8", "::1/128")


class FakeMonotonic:
    """An injected clock for the local cache TTLs."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeMonotonic:
    return FakeMonotonic()


@pytest.fixture
def resolver(
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    registry: CollectorRegistry,
    clock: FakeMonotonic,
) -> IdentityResolver:
    return IdentityResolver(
        rclient,
        auth_client,
        IdentityConfig(trusted_proxies=TRUSTED),
        registry=registry,
        clock=clock,
    )


async def issue_key(
    stub: pb_grpc.CreditServiceAsyncStub, token: str, pid: str
) -> pb.IssueApiKeyResponse:
    reply: pb.IssueApiKeyResponse = await stub.IssueApiKey(
        pb.IssueApiKeyRequest(request_id=f"k-{secrets.token_hex(6)}", project_id=pid, name="t"),
        metadata=admin_md(token),
        timeout=10,
    )
    return reply


async def revoke_key(stub: pb_grpc.CreditServiceAsyncStub, token: str, key_id: str) -> None:
    await stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(request_id=f"r-{key_id}", key_id=key_id),
        metadata=admin_md(token),
        timeout=10,
    )


@pytest.fixture
async def issued(
    authority: AuthorityServer, authority_stub: pb_grpc.CreditServiceAsyncStub
) -> tuple[str, pb.IssueApiKeyResponse]:
    pid = new_project_id()
    await make_wallet(authority_stub, authority.config.admin_token, pid, balance=10)
    return pid, await issue_key(authority_stub, authority.config.admin_token, pid)


async def test_missing_and_malformed_credentials_make_no_network_call(
    resolver: IdentityResolver, auth_client: AuthorityClient
) -> None:
    assert await resolver.identify({}, "192.0.2.1") is Reason.MISSING_CREDENTIAL
    assert await resolver.identify({"Authorization": "Basic dXNlcg=="}, None) is (
        Reason.MISSING_CREDENTIAL
    )
    for bad in ("cg_short", "sk_" + "a" * 43, "cg_" + "a" * 42 + "!", "Bearer"):
        got = await resolver.identify({"Authorization": f"Bearer {bad}"}, "192.0.2.1")
        assert got is Reason.INVALID_CREDENTIAL, bad
        assert await resolver.identify({"X-Api-Key": bad}, "192.0.2.1") is (
            Reason.INVALID_CREDENTIAL
        )
    assert auth_client.calls["ResolveApiKey"] == 0


async def test_valid_key_by_bearer_or_header_then_cached(
    resolver: IdentityResolver,
    auth_client: AuthorityClient,
    issued: tuple[str, pb.IssueApiKeyResponse],
    rclient: aioredis.Redis,
    registry: CollectorRegistry,
) -> None:
    pid, key = issued
    want = Identity(project_id=pid, key_hash=key_hash(key.secret))
    assert await resolver.identify({"authorization": f"Bearer {key.secret}"}, "192.0.2.1") == want
    assert await resolver.identify({"X-Api-Key": key.secret}, "192.0.2.1") == want
    assert await resolver.resolve(key.secret) == pid
    assert auth_client.calls["ResolveApiKey"] == 1  # then the local cache answered
    assert await rclient.get(keys.api_key(key_hash(key.secret))) == pid.encode()
    labels = {"source": "local", "result": "valid"}
    assert registry.get_sample_value("creditgate_key_resolutions_total", labels) == 2


async def test_redis_tier_answers_a_fresh_process_while_watch_is_up(
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    resolver: IdentityResolver,
    issued: tuple[str, pb.IssueApiKeyResponse],
) -> None:
    pid, key = issued
    assert await resolver.resolve(key.secret) == pid
    other = IdentityResolver(rclient, auth_client, registry=CollectorRegistry())
    other.set_watch_connected(True)
    before = auth_client.calls["ResolveApiKey"]
    assert await other.resolve(key.secret) == pid
    assert auth_client.calls["ResolveApiKey"] == before


async def test_unknown_key_is_invalid_and_negatively_cached(
    resolver: IdentityResolver, auth_client: AuthorityClient, clock: FakeMonotonic
) -> None:
    secret = "cg_" + secrets.token_urlsafe(32)
    for _ in range(3):
        assert await resolver.identify({"X-Api-Key": secret}, None) is Reason.INVALID_CREDENTIAL
    assert auth_client.calls["ResolveApiKey"] == 1
    clock.now += 10  # past the negative TTL: asked again
    assert await resolver.identify({"X-Api-Key": secret}, None) is Reason.INVALID_CREDENTIAL
    assert auth_client.calls["ResolveApiKey"] == 2


async def test_revoked_key_is_invalid(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    resolver: IdentityResolver,
    issued: tuple[str, pb.IssueApiKeyResponse],
) -> None:
    _, key = issued
    await revoke_key(authority_stub, authority.config.admin_token, key.key.key_id)
    got = await resolver.identify({"X-Api-Key": key.secret}, None)
    assert got is Reason.INVALID_CREDENTIAL


async def test_project_header_only_from_trusted_proxies(
    resolver: IdentityResolver,
    auth_client: AuthorityClient,
    issued: tuple[str, pb.IssueApiKeyResponse],
) -> None:
    pid, key = issued
    header = {"X-Creditgate-Project": "someone-else"}
    trusted = await resolver.identify(header, "10.1.2.3")
    assert trusted == Identity(project_id="someone-else", key_hash=None, via_trusted_proxy=True)
    assert await resolver.identify({"x-creditgate-project": "p-v6"}, "::1") == Identity(
        "p-v6", None, True
    )
    assert await resolver.identify({"X-Creditgate-Project": "Bad Id!"}, "10.0.0.1") is (
        Reason.INVALID_REQUEST
    )
    # SECURITY: from anywhere else the header is ignored: the credential decides.
    assert await resolver.identify(header, "192.0.2.1") is Reason.MISSING_CREDENTIAL
    assert await resolver.identify(header, None) is Reason.MISSING_CREDENTIAL
    assert await resolver.identify(header, "not-an-ip") is Reason.MISSING_CREDENTIAL
    spoofed = await resolver.identify({**header, "X-Api-Key": key.secret}, "11.0.0.1")
    assert spoofed == Identity(project_id=pid, key_hash=key_hash(key.secret))
    assert auth_client.calls["ResolveApiKey"] == 1


async def test_authority_down_is_unavailable_not_invalid(
    rclient: aioredis.Redis, registry: CollectorRegistry
) -> None:
    cfg = AuthorityClientConfig(target=f"127.0.0.1:{free_port()}", token="t", timeout_s=0.5)
    async with AuthorityClient(cfg) as client:
        resolver = IdentityResolver(rclient, client, registry=registry)
        secret = "cg_" + secrets.token_urlsafe(32)
        assert await resolver.identify({"X-Api-Key": secret}, None) is Reason.UNAVAILABLE


async def test_revocation_is_effective_within_1s_via_watch(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    auth_client: AuthorityClient,
    resolver: IdentityResolver,
    registry: CollectorRegistry,
    issued: tuple[str, pb.IssueApiKeyResponse],
) -> None:
    pid, key = issued
    filler = CacheFiller(rclient, auth_client, unsettled_limit=1, shards=SHARDS, registry=registry)
    snapshot = await auth_client.get_snapshot(pid)
    assert snapshot is not None
    sub = WatchSubscriber(
        filler,
        key_caches=(resolver,),
        start_cursor=snapshot.cursor,
        resync_on_start=False,
        registry=registry,
    )
    await sub.start()
    try:
        assert await resolver.resolve(key.secret) == pid
        # Connected: the long positive TTL applies, only the Watch push can end the entry.
        await authority_stub.TopUp(
            pb.TopUpRequest(request_id=f"t-{pid}", project_id=pid, amount=1),
            metadata=admin_md(authority.config.admin_token),
            timeout=10,
        )
        await sub.wait_connected()
        await revoke_key(authority_stub, authority.config.admin_token, key.key.key_id)

        async def revoked() -> bool:
            return await resolver.resolve(key.secret) is None

        await eventually(revoked, within_s=1.0)
        assert await rclient.get(keys.api_key(key_hash(key.secret))) is None
    finally:
        await sub.aclose()
        await filler.aclose()


async def test_without_watch_local_entries_live_at_most_1s(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    resolver: IdentityResolver,
    auth_client: AuthorityClient,
    clock: FakeMonotonic,
    issued: tuple[str, pb.IssueApiKeyResponse],
) -> None:
    pid, key = issued
    assert await resolver.resolve(key.secret) == pid
    await revoke_key(authority_stub, authority.config.admin_token, key.key.key_id)
    clock.now += 0.5
    assert await resolver.resolve(key.secret) == pid  # still within the 1 s bound
    clock.now += 0.6
    # Past 1 s: asked again, and the authority (not the Redis mapping) answers first.
    assert await resolver.resolve(key.secret) is None
    assert auth_client.calls["ResolveApiKey"] == 2


async def test_concurrent_resolutions_of_one_key_share_one_call(
    resolver: IdentityResolver,
    auth_client: AuthorityClient,
    issued: tuple[str, pb.IssueApiKeyResponse],
) -> None:
    pid, key = issued
    port: CredentialResolver = resolver
    results = await asyncio.gather(*(port.resolve(key.secret) for _ in range(20)))
    assert results == [pid] * 20
    assert auth_client.calls["ResolveApiKey"] == 1


async def test_wrong_gateway_token_is_unavailable_not_a_crash(
    authority: AuthorityServer, rclient: aioredis.Redis, registry: CollectorRegistry
) -> None:
    cfg = AuthorityClientConfig(target=authority.grpc_target, token="wrong-token")
    async with AuthorityClient(cfg) as client:
        resolver = IdentityResolver(rclient, client, registry=registry)
        secret = "cg_" + secrets.token_urlsafe(32)
        assert await resolver.identify({"X-Api-Key": secret}, None) is Reason.UNAVAILABLE
        filler: SnapshotFiller = CacheFiller(rclient, client, shards=SHARDS, registry=registry)
        with pytest.raises(AuthorityUnavailable) as info:
            await filler.fill(new_project_id())
        assert isinstance(info.value.__cause__, AuthorityRequestFailed)
        assert info.value.__cause__.code == "UNAUTHENTICATED"


async def test_authority_down_costs_one_failed_call_per_retry_interval(
    rclient: aioredis.Redis, registry: CollectorRegistry, clock: FakeMonotonic
) -> None:
    """Watch down and the authority unreachable: keys known to Redis still resolve, and the
    authority's timeout is paid once per `authority_retry_s`, not by every request."""
    cfg = AuthorityClientConfig(target=f"127.0.0.1:{free_port()}", token="t", timeout_s=0.5)
    async with AuthorityClient(cfg) as client:
        resolver = IdentityResolver(rclient, client, registry=registry, clock=clock)
        secrets_ = ["cg_" + secrets.token_urlsafe(32) for _ in range(2)]
        projects = [new_project_id() for _ in secrets_]
        for secret, pid in zip(secrets_, projects, strict=True):
            await rclient.set(keys.api_key(key_hash(secret)), pid)
        unknown = "cg_" + secrets.token_urlsafe(32)

        assert await resolver.resolve(secrets_[0]) == projects[0]  # asked, failed, Redis
        assert client.calls["ResolveApiKey"] == 1
        assert await resolver.resolve(secrets_[1]) == projects[1]  # Redis straight away
        assert await resolver.identify({"X-Api-Key": unknown}, None) is Reason.UNAVAILABLE
        clock.now += 0.5
        assert await resolver.resolve(secrets_[0]) == projects[0]  # Redis again, no timeout
        assert client.calls["ResolveApiKey"] == 1

        clock.now += 0.6  # past authority_retry_s: the authority is asked again
        assert await resolver.resolve(secrets_[1]) == projects[1]
        assert client.calls["ResolveApiKey"] == 2


async def test_a_key_revoked_while_the_authority_was_away_stops_within_1s(
    authority: AuthorityServer,
    authority_stub: pb_grpc.CreditServiceAsyncStub,
    rclient: aioredis.Redis,
    registry: CollectorRegistry,
    clock: FakeMonotonic,
    issued: tuple[str, pb.IssueApiKeyResponse],
) -> None:
    """Invariant 6 with the Watch stream down: the authority fails once (Redis answers for the
    next second), the key is revoked meanwhile and the authority comes back. The Redis
    mapping nobody deleted must not keep the key alive past one second."""
    pid, key = issued
    await rclient.set(keys.api_key(key_hash(key.secret)), pid)
    other_secret, other_pid = "cg_" + secrets.token_urlsafe(32), new_project_id()
    await rclient.set(keys.api_key(key_hash(other_secret)), other_pid)
    down = AuthorityClientConfig(target=f"127.0.0.1:{free_port()}", token="t", timeout_s=0.5)
    async with AuthorityClient(down) as unreachable:
        away = IdentityResolver(rclient, unreachable, registry=registry, clock=clock)
        # Another key's lookup finds the authority away: Redis answers for the next second.
        assert await away.resolve(other_secret) == other_pid
        await revoke_key(authority_stub, authority.config.admin_token, key.key.key_id)
        clock.now += 0.9
        assert await away.resolve(key.secret) == pid  # within the second: Redis still says so
        # The authority is back (same resolver state, a reachable client).
        up = AuthorityClientConfig(
            target=authority.grpc_target, token=authority.config.admin_token, timeout_s=2.0
        )
        async with AuthorityClient(up) as reachable:
            away.authority = reachable
            clock.now += 0.2  # 1.1 s after the failure, 1.1 s after the revocation at most
            assert await away.resolve(key.secret) is None
