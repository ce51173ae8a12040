"""One Redis pub/sub channel that every process hears: any process publishes a batch of
messages in one round trip, each process keeps one connection that hands each message on.
A lost connection is re-made with backoff; `on_connect` says whether it is a re-connection
(messages sent meanwhile were missed: the listener must catch up some other way)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import RedisCluster

from khqr_gateway.infra.schedule import RedisClient

log = logging.getLogger(__name__)

# KEYS[1] the channel; ARGV the messages. One round trip for a batch, and one that a Redis
# Cluster runs too (it refuses PUBLISH in a pipeline); a PUBLISH on any node reaches the
# subscribers of every node.
_PUBLISH = "for i = 1, #ARGV do redis.call('PUBLISH', KEYS[1], ARGV[i]) end return #ARGV"
BACKOFF_MAX_S = 5.0


class Broadcast:
    """Publish to, and listen on, one channel; `what` names it in log lines."""

    def __init__(
        self,
        redis: RedisClient,
        channel: str,
        *,
        what: str,
        on_message: Callable[[bytes | str], None],
        on_connect: Callable[[bool], None] = lambda again: None,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.what = what
        self.on_message = on_message
        self.on_connect = on_connect
        self.ready = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._publish: Any = redis.register_script(_PUBLISH)

    async def publish(self, messages: Sequence[bytes]) -> None:
        """Send `messages` to every process (this one too); raises what Redis raises."""
        if messages:
            await self._publish(keys=[self.channel], args=list(messages))

    def start(self) -> None:
        """Listen, unless listening already."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name=f"khqr-{self.what}")

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def _listen(self) -> None:
        backoff = 0.1
        connected_before = False
        while True:
            pubsub = None
            try:
                if isinstance(self.redis, RedisCluster):
                    await self.redis.initialize()  # its pub/sub needs the slots, not given lazily
                pubsub = self.redis.pubsub()
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.ready.set()
                        self.on_connect(connected_before)
                        connected_before = True
                        backoff = 0.1
                    elif message["type"] == "message":
                        self.on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.ready.clear()
                log.warning("%s: Redis pub/sub lost (%s); reconnecting", self.what, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
