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

    __slots__ = ("_closed", "_released", "_reported", "_request", "decision")

    def __init__(self, decision: Decision, request: web.Request) -> None:
        self.decision = decision
        # The request as the handler got it, until its response is prepared: a task the
        # handler started inherits the handle with its context (CURRENT) and must not keep
        # the request alive after that.
        self._request: web.Request | None = request
        self._reported: int | None = None
        self._released = False
        self._closed = False

    def admitted(self, request: web.Request) -> bool:
        """Whether `request` is the very request object this handle was made for (until its
        response is prepared)."""
        return self._request is request

    def prepared(self) -> None:
        """The response is prepared (its headers are out): the handle lets go of the request.
        usage(request) still finds it through the request (USAGE_KEY)."""
        self._request = None

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


USAGE_KEY = web.RequestKey("creditgate_usage", UsageHandle)

# The handle of the request admitted in this task, for a quicker way to it than
# request.get(USAGE_KEY), which runs two Python-level mapping methods. aiohttp handles each
# request in a task of its own, with a copy of the connection's context, so the value is seen
# by the request's handler, the tasks that handler starts and its response's prepare hook. It
# is a shortcut, checked against the request it is asked for: a response of another request
# prepared in this task (a handler streaming to other clients), or a request admitted in
# another task (a middleware running the handler under asyncio.wait_for), finds its own
# handle through the request.
CURRENT: ContextVar[UsageHandle | None] = ContextVar("creditgate_usage", default=None)


def handle_of(request: web.Request) -> UsageHandle | None:
    """The usage handle of `request` if it was admitted on a protected route, else None.

    Also for the original of a request whose clone (request.clone(), in a middleware outside
    admission) was admitted: aiohttp prepares the response with the original, which shares
    the clone's writer (one per HTTP exchange) but not its mapping.
    """
    current = CURRENT.get()
    if current is not None and current.admitted(request):
        return current
    handle = request.get(USAGE_KEY)
    if isinstance(handle, UsageHandle):
        return handle
    if current is not None:
        admitted = current._request
        if admitted is not None and admitted.writer is request.writer:
            return current
    return None


def usage(request: web.Request) -> UsageHandle:
    """The usage handle of an admitted request on a route protected by the plugin."""
    handle = handle_of(request)
    if handle is None:
        raise UsageError(
            f"no creditgate usage handle for {request.method} {request.path}: the route is not "
            "protected by gateway_plugin.setup(), or the request was not admitted"
        )
    return handle
