"""Reading a gap's events back from the sender: `GET /v1/events?subject=…` (docs/api.md).

`EventsSource` is what catching up needs; `EventsApi` is that, over HTTP with aiohttp (already
the project's HTTP client; a few requests per gap need nothing more). The listing is newest
first, so the pages are walked until every wanted sequence is found or the subject's history
ends. The event that revealed the gap (`must_see`) must be in that history: an API key of another
merchant, or the wrong base URL, would otherwise make every gap look like purged events.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any, Protocol

import aiohttp

from receiver.errors import BackfillError, BadEvent
from receiver.event import ReceivedEvent, parse_event

PAGE_SIZE = 100


class EventsSource(Protocol):
    async def find(
        self, subject: str, sequences: Set[int], must_see: str
    ) -> dict[int, ReceivedEvent]:
        """The subject's events with these sequences, by sequence. A sequence left out does not
        exist any more (purged). Raises BackfillError when that cannot be known."""
        ...

    async def close(self) -> None: ...


class EventsApi:
    """The sender's events API at `base_url` (e.g. `https://payments.example.com`), read with
    the merchant's secret API key."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 10.0) -> None:
        self._url = base_url.rstrip("/") + "/v1/events"
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def find(
        self, subject: str, sequences: Set[int], must_see: str
    ) -> dict[int, ReceivedEvent]:
        found: dict[int, ReceivedEvent] = {}
        seen_witness = False
        params = {"subject": subject, "limit": str(PAGE_SIZE)}
        while True:
            page = await self._page(params)
            for item in page["data"]:
                try:
                    event = parse_event(item)
                except BadEvent as exc:
                    raise BackfillError(f"the events API sent a malformed event: {exc}") from None
                if event.subject != subject:
                    raise BackfillError(f"asked for {subject}, the events API sent {event.subject}")
                seen_witness = seen_witness or event.id == must_see
                if event.sequence in sequences:
                    found[event.sequence] = event
            if seen_witness and len(found) == len(sequences):
                return found
            if not page["has_more"] or not page["data"]:
                break
            params["starting_after"] = page["data"][-1]["id"]
        if not seen_witness:
            raise BackfillError(
                f"the events API does not list {must_see} of {subject}: is the API key the "
                "merchant's, and the URL the API's?"
            )
        return found

    async def _page(self, params: dict[str, str]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.get(self._url, params=params) as response:
                if response.status != 200:
                    text = (await response.text())[:200]
                    raise BackfillError(f"GET {self._url}: HTTP {response.status} {text}")
                page = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise BackfillError(f"GET {self._url}: {type(exc).__name__}: {exc}") from None
        if (
            not isinstance(page, dict)
            or not isinstance(page.get("data"), list)
            or not isinstance(page.get("has_more"), bool)
        ):
            raise BackfillError(f"GET {self._url}: not a list object")
        return page
