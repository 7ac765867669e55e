"""Problem types: what each problem `code` means, served at `GET /problems/<code>`, the `type`
URI of every problem body (api/errors.py).

The catalogue is the error classes themselves: each LedgerError subclass states its status, code
and title, and its docstring is the description, so an error is documented where it is defined.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.errors import PROBLEM_TYPE, LedgerError, NotFound
from api.http import json_response


def catalogue() -> dict[str, type[LedgerError]]:
    """code -> the error class that defines it (the first found, walking the subclasses of
    LedgerError breadth first)."""
    found: dict[str, type[LedgerError]] = {}
    pending = list(LedgerError.__subclasses__())
    while pending:
        cls = pending.pop(0)
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def describe(cls: type[LedgerError]) -> dict[str, Any]:
    return {
        "object": "problem_type",
        "type": PROBLEM_TYPE + cls.code,
        "code": cls.code,
        "status": cls.status,
        "title": cls.title,
        "description": " ".join((cls.__doc__ or "").split()),
    }


async def problem_type(request: Request) -> Response:
    code = request.path_params["code"]
    cls = catalogue().get(code)
    if cls is None:
        raise NotFound(f"No such problem type: {code}", param="code")
    return json_response(describe(cls))


routes = [Route(PROBLEM_TYPE + "{code}", problem_type, methods=["GET"])]
