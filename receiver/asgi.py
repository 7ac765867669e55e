"""The Starlette (ASGI) integration: a route that answers our webhooks, and an app around it.

    app = create_app(inbox, path="/webhooks")     # or add webhook_route(...) to your own app
                                                  # and run inbox.running() in its lifespan

Answers: 200 `{"outcome": …}` once the event is applied, held, handed over as late or found to
be a duplicate; 401 when no secret verifies it; 400 for a signed body that is not an orderable
event; 413 over `max_body`; 503 with `Retry-After` while the database cannot be reached; 500 when
the handler raised. The sender retries every non-2xx answer with the same `webhook-id`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import psycopg
from psycopg_pool import PoolTimeout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from receiver.errors import BadEvent, BadSignature
from receiver.inbox import Inbox

log = logging.getLogger("receiver")

MAX_BODY = 1024 * 1024


class _TooLarge(Exception):
    pass


async def _body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def webhook_route(path: str, inbox: Inbox, *, max_body: int = MAX_BODY) -> Route:
    """`POST path`: one webhook request, through `inbox.receive`."""

    async def endpoint(request: Request) -> Response:
        try:
            body = await _body(request, max_body)
            outcome = await inbox.receive(body, request.headers)
        except _TooLarge:
            return JSONResponse({"error": "body too large"}, 413)
        except BadSignature as exc:
            return JSONResponse({"error": f"signature not verified: {exc}"}, 401)
        except BadEvent as exc:
            return JSONResponse({"error": str(exc)}, 400)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("database unavailable: %s", exc)
            return JSONResponse({"error": "database unavailable"}, 503, {"Retry-After": "1"})
        except Exception:
            log.exception("the handler failed on %s", request.headers.get("webhook-id"))
            return JSONResponse({"error": "the event could not be applied"}, 500)
        return JSONResponse({"outcome": outcome.value})

    return Route(path, endpoint, methods=["POST"])


def create_app(
    inbox: Inbox, *, path: str = "/webhooks", routes: Sequence[BaseRoute] = ()
) -> Starlette:
    """A Starlette app serving the webhook route (and `routes`), whose lifespan opens the
    inbox's pool and runs its catching up."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with inbox.pool, inbox.running():
            yield

    return Starlette(routes=[webhook_route(path, inbox), *routes], lifespan=lifespan)

