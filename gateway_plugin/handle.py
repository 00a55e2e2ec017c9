"""The request-scoped usage handle: how a handler reports the actual cost of its request.

`gateway_plugin.usage(request)` returns it for every admitted request on a protected route.
"""

from __future__ import annotations

from contextvars import ContextVar

from aiohttp import web

from admission.decision import Decision, Hold

MAX_AMOUNT = 10**15


class UsageError(ValueError):
    """A handler used the usage handle wrongly (bad amount, after the request ended, ...)."""


class UsageHandle:
    """What the middleware will do with the request's hold when the handler is done.

    By default the hold's amount is committed; `report(n)` commits n instead (at most the hold,
    unless the route allows overage); `release()` ends the hold with no charge.
    """

    __slots__ = ("_closed", "_released", "_reported", "decision", "request")

    def __init__(self, decision: Decision, request: web.Request) -> None:
        self.decision = decision
        self.request = request  # the request as the handler got it
        self._reported: int | None = None
        self._released = False
        self._closed = False

    @property
    def project_id(self) -> str | None:
        return self.decision.project_id

    @property
    def hold(self) -> Hold | None:
        return self.decision.hold

    @property
    def hold_amount(self) -> int:
        hold = self.decision.hold
        return hold.amount if hold is not None else 0

    @property
    def reported(self) -> int | None:
        return self._reported

    @property
    def released(self) -> bool:
        return self._released

    def report(self, amount: object) -> None:
        """Charge `amount` instead of the held amount. May be called again to correct it.

        Typed `object`, checked here: a compiled build would otherwise reject a non-int
        with TypeError before this method could answer UsageError.
        """
        if type(amount) is not int:
            raise UsageError(f"usage must be an int, got {type(amount).__name__}")
        self._check_open()
        hold = self.decision.hold
        if amount < 0:
            raise UsageError(f"usage must be >= 0, got {amount}")
        if amount > MAX_AMOUNT:
            raise UsageError(f"usage above the maximum {MAX_AMOUNT}: {amount}")
        if hold is None:
            # Shadow requests the rules would have denied, and degraded admits, hold nothing:
            # the report is accepted (the handler must not fail) and charges nothing.
            if amount and not (self.decision.shadow or self.decision.degraded):
                raise UsageError("this request holds no credits: only 0 can be reported")
        elif amount > hold.amount and not hold.allow_overage:
            raise UsageError(
                f"usage {amount} exceeds the hold of {hold.amount} and route "
                f"{hold.route!r} does not allow overage"
            )
        if self._released:
            raise UsageError("the hold was released: nothing can be reported")
        self._reported = amount

    def release(self) -> None:
        """End the hold with no charge (e.g. the handler served nothing billable)."""
        self._check_open()
        self._released = True
        self._reported = None

    def commit_amount(self) -> int:
        """The amount the middleware commits: the reported usage, else the held amount."""
        reported = self._reported
        return reported if reported is not None else self.hold_amount

    def close(self) -> None:
        """Called by the middleware once the hold is being settled."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the request's hold is already settled")


# The handle of the request being handled. aiohttp handles each request in a task of its own
# (with a copy of the connection's context), so a value set while admitting a request is seen
# by its handler, by the tasks the handler starts and by its response's prepare hook, and by
# no other request. A context variable costs a fraction of request[key] = value and
# request.get(key), which run Python-level mapping methods on every request.
CURRENT: ContextVar[UsageHandle | None] = ContextVar("creditgate_usage", default=None)


def handle_of(request: web.Request) -> UsageHandle | None:
    """The usage handle of `request` if it was admitted on a protected route, else None."""
    handle = CURRENT.get()
    if handle is not None and handle.request is request:
        return handle
    return None


def usage(request: web.Request) -> UsageHandle:
    """The usage handle of an admitted request on a route protected by the plugin."""
    handle = handle_of(request)
    if handle is None:
        raise UsageError(
            f"no creditgate usage handle for {request.method} {request.path}: the route is not "
            "protected by gateway_plugin.setup() (or the request was not admitted)"
        )
    return handle
