"""A small Server-Sent Events reader for tests: events as dicts, comments kept apart."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class Event:
    data: str
    id: str | None = None

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class Reader:
    """Reads one SSE response event by event."""

    response: aiohttp.ClientResponse
    comments: list[str] = field(default_factory=list)
    ended: bool = False

    async def next(self, timeout: float = 5.0) -> Event | None:
        """The next event; None when the server ended the stream."""
        async with asyncio.timeout(timeout):
            return await self._next()

    async def _next(self) -> Event | None:
        data: list[str] = []
        event_id = None
        while True:
            raw = await self.response.content.readline()
            if not raw:
                self.ended = True
                return None
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    return Event("\n".join(data), event_id)
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                self.comments.append(value)
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value

    async def rest(self, timeout: float = 5.0) -> list[Event]:
        """Every event until the server ends the stream."""
        events: list[Event] = []
        async with asyncio.timeout(timeout):
            while (event := await self._next()) is not None:
                events.append(event)
        return events
