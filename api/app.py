"""The Starlette application: routes, the connection pool, and one error handler for all."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg import AsyncConnection
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from api import problems, routes_events, routes_ledger, routes_ops, routes_webhooks, uow
from api.errors import (
    InternalError,
    LedgerError,
    MethodNotAllowed,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from api.http import problem_response
from api.limits import HeaderLimitMiddleware
from api.metrics import MetricsMiddleware
from api.requestid import RequestIdMiddleware
from db.pool import ConnectionPool
from db.settings import database_url

log = logging.getLogger("payments.api")

ROUTES = [
    *routes_ledger.routes,
    *routes_events.routes,
    *routes_webhooks.routes,
    *routes_ops.routes,
    *problems.routes,
]


async def _configure(conn: AsyncConnection) -> None:
    await conn.set_autocommit(True)


async def _ledger_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LedgerError)
    if (
        exc.status in (400, 413, 415)
        and request.url.path.startswith("/v1/")
        and getattr(request.state, "merchant", None) is None
    ):
        # Refused before authentication: a caller without a valid key learns nothing more.
        try:
            await uow.authenticated(request)
        except (Unauthenticated, Unavailable) as auth_error:
            exc = auth_error
    if exc.status >= 500:
        cause = exc.__cause__
        log.warning("%s %s: %d %s: %s", request.method, request.url.path, exc.status, exc.code,
                    " ".join(str(cause or exc.detail).split())[:300])
    headers = {"Retry-After": "1"} if isinstance(exc, Unavailable) else None
    return problem_response(exc, headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on the request's path (several routes may share a path)."""
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for route in request.app.router.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return problem_response(
            MethodNotAllowed(f"{request.method} is not allowed here."),
            {"Allow": ", ".join(allowed_methods(request))},
        )
    if exc.status_code == 404:
        return problem_response(NotFound(f"No route {request.url.path}."))
    error = LedgerError(str(exc.detail))
    error.status = exc.status_code
    return problem_response(error)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(InternalError("An unexpected error occurred; it has been logged."))


class _App(Starlette):
    """Starlette with the request id outermost: outside its error handling, so that every
    response (a 500 included) carries `Request-Id` and every log line of the request names it."""

    def build_middleware_stack(self) -> ASGIApp:
        return RequestIdMiddleware(super().build_middleware_stack())


def create_app(url: str | None = None, pool_size: int = 16) -> Starlette:
    conninfo = url or database_url()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = ConnectionPool(
            conninfo,
            min_size=2,
            max_size=pool_size,
            configure=_configure,
            kwargs={"application_name": "payments-api"},
            timeout=5,
            open=False,
        )
        await pool.open(wait=False)
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    return _App(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=[Middleware(MetricsMiddleware), Middleware(HeaderLimitMiddleware)],
        exception_handlers={
            LedgerError: _ledger_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
