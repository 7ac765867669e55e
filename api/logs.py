"""The API's log lines: uvicorn's own as uvicorn writes them, and the application's (payments.api,
psycopg's pool) one per line with time, level, logger, message and, while a request is served,
its `request_id` (api/requestid.py)."""

from __future__ import annotations

import copy
import logging
from typing import Any

from uvicorn.config import LOGGING_CONFIG


class AppFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} request_id={rid}" if rid else line


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration plus a stderr handler for everything else at `level`."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": "api.requestid.RequestIdFilter"}}
    config["formatters"]["app"] = {"()": "api.logs.AppFormatter"}
    config["handlers"]["app"] = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "app",
        "filters": ["request_id"],
    }
    config["root"] = {"handlers": ["app"], "level": level.upper()}
    # The pool logs every checkout at INFO; its warnings (lost connections) are what matter.
    config["loggers"]["psycopg"] = {"level": "WARNING"}
    return config
