"""Field validation for request bodies and query strings. Every failure names its parameter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from starlette.datastructures import QueryParams

from api.errors import InvalidRequest

MAX_AMOUNT = 10**15

# ISO 4217 active codes.
CURRENCIES = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP
    BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL
    GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW
    KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN
    NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK
    SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU
    UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL""".split()
)

EVENT_TYPES = frozenset(
    {
        "account.created",
        "account.balance_changed",
        "deposit.succeeded",
        "payment.succeeded",
        "payment.failed",
        "payment.refunded",
        "refund.succeeded",
        "payout.paid",
    }
)
EVENT_PREFIXES = frozenset(t.split(".", 1)[0] for t in EVENT_TYPES)
MAX_METADATA_KEYS = 50
_DIGITS = re.compile(r"^[0-9]{1,3}\Z")


def only(body: dict[str, Any], *allowed: str) -> None:
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"Unknown parameter: {name}.", param=name)


def required(body: dict[str, Any], name: str) -> Any:
    if name not in body or body[name] is None:
        raise InvalidRequest(f"Missing required parameter: {name}.", param=name)
    return body[name]


def amount(value: Any, name: str = "amount") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer in minor units.", param=name)
    if not 1 <= value <= MAX_AMOUNT:
        raise InvalidRequest(f"{name} must be between 1 and {MAX_AMOUNT}.", param=name)
    return value


def currency(value: Any, name: str = "currency") -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a three-letter ISO 4217 code.", param=name)
    if value not in CURRENCIES:
        if value.upper() in CURRENCIES:
            raise InvalidRequest(f"{name} must be upper case: {value.upper()}.", param=name)
        raise InvalidRequest(f"Unknown currency: {value[:16]}.", param=name)
    return value


def object_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 128 or "\x00" in value:
        raise InvalidRequest(f"{name} must be an id string.", param=name)
    return value


def optional_text(body: dict[str, Any], name: str, max_len: int = 1000) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise InvalidRequest(
            f"{name} must be a string of at most {max_len} characters.", param=name
        )
    return value


def metadata(body: dict[str, Any]) -> dict[str, Any]:
    value = body.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be an object.", param="metadata")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidRequest(
            f"metadata may have at most {MAX_METADATA_KEYS} keys.", param="metadata"
        )
    for key, item in value.items():
        # As Stripe: string keys and string values. Numbers would not survive a round trip
        # through jsonb unchanged (1e20 comes back as a 21-digit integer).
        if len(key) > 40 or not isinstance(item, str) or len(item) > 500:
            raise InvalidRequest(
                "metadata keys are strings of at most 40 characters and values strings of at"
                " most 500.",
                param="metadata",
            )
    return value


def event_types(value: Any, name: str = "event_types") -> list[str]:
    if not isinstance(value, list) or not value or len(value) > 100:
        raise InvalidRequest(f"{name} must be a non-empty list of event type patterns.", param=name)
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _known_pattern(item):
            raise InvalidRequest(
                f'{name} entries are "*", a prefix such as "payment.*", or an exact type.',
                param=name,
            )
        if item not in out:
            out.append(item)
    return out


def _known_pattern(item: str) -> bool:
    if item == "*" or item in EVENT_TYPES:
        return True
    return item.endswith(".*") and item[:-2] in EVENT_PREFIXES


def timestamp(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be an RFC 3339 timestamp.", param=name)
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an RFC 3339 timestamp.", param=name) from None
    if moment.tzinfo is None:
        raise InvalidRequest(f"{name} must carry a time zone (e.g. Z).", param=name)
    return moment.astimezone(UTC)


def day(value: str | None, name: str = "day") -> date:
    if value is None:
        raise InvalidRequest(f"Missing required parameter: {name}.", param=name)
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date YYYY-MM-DD.", param=name) from None


@dataclass(frozen=True, slots=True)
class ListParams:
    limit: int
    starting_after: str | None
    ending_before: str | None


def list_params(query: QueryParams) -> ListParams:
    raw = query.get("limit")
    limit = 10
    if raw is not None:
        if not _DIGITS.match(raw) or not 1 <= int(raw) <= 100:
            raise InvalidRequest("limit must be an integer from 1 to 100.", param="limit")
        limit = int(raw)
    after = query.get("starting_after") or None
    before = query.get("ending_before") or None
    if after and before:
        raise InvalidRequest(
            "Use starting_after or ending_before, not both.", param="ending_before"
        )
    for name, value in (("starting_after", after), ("ending_before", before)):
        if value is not None and (len(value) > 128 or "\x00" in value):
            raise InvalidRequest(f"{name} must be an id.", param=name)
    return ListParams(limit, after, before)
