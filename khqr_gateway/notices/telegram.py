"""Telegram notices of payments: the message (pure) and the lane that sends it, retried."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import orjson

from khqr_gateway import times
from khqr_gateway.apps.model import DEFAULT_APP_ID
from khqr_gateway.notices import store
from khqr_gateway.notices.model import AppChat, DueNotice, NoticeAttempt
from khqr_gateway.transactions.model import Status

log = logging.getLogger(__name__)

PHNOM_PENH = ZoneInfo("Asia/Phnom_Penh")
LEASE_S = 30.0
IDLE_S = 5.0
SEND_TIMEOUT_S = 15.0
RESPONSE_BODY_LIMIT = 4096
# Telegram asks for a pause with 429 `parameters.retry_after`; more than this is a bot
# banned for a while, retried then anyway rather than held for hours.
RETRY_AFTER_MAX_S = 3600.0
# Answers that no retry can change: the chat is gone, the bot was blocked or removed, the
# token is wrong (401, or 404 for a token of no bot).
FINAL_STATUSES = frozenset({400, 401, 403, 404})

TEXTS = {
    "en": {
        "success": "✅ Payment received",
        "late": "✅ Payment received after the QR timed out",
        "late_cancelled": "✅ Payment received after the payment was cancelled",
        "mismatch": "⚠️ Payment does not match the request",
        "amount": "Amount",
        "to": "Paid to",
        "from": "Payer",
        "bill": "Bill number",
        "order": "Order",
        "time": "Time",
        "reason": "Why",
    },
    "km": {
        "success": "✅ បានទទួលការទូទាត់",
        "late": "✅ បានទទួលការទូទាត់ ក្រោយ QR ផុតកំណត់",
        "late_cancelled": "✅ បានទទួលការទូទាត់ ក្រោយការលុបចោល",
        "mismatch": "⚠️ ការទូទាត់មិនត្រូវនឹងសំណើ",
        "amount": "ចំនួនទឹកប្រាក់",
        "to": "គណនីទទួល",
        "from": "អ្នកបង់",
        "bill": "លេខវិក្កយបត្រ",
        "order": "លេខបញ្ជាទិញ",
        "time": "ពេលវេលា",
        "reason": "មូលហេតុ",
    },
}


def _amount(value: Any, currency: str | None) -> str:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return str(value)
    places = 0 if currency == "KHR" else 2
    return f"{number:,.{places}f}"


def _paid_at(notice: DueNotice) -> datetime:
    ms = (notice.data or {}).get("acknowledgedDateMs")
    if isinstance(ms, int | float) and not isinstance(ms, bool):
        try:
            return times.from_ms(ms)
        except (OverflowError, OSError, ValueError):
            pass
    return notice.completed_at


def message_text(notice: DueNotice, language: str) -> str:
    """The notice as a shop owner reads it: what, how much, who, which bill, when."""
    words = TEXTS.get(language, TEXTS["en"])
    data = notice.data or {}
    currency = data.get("currency")
    title = words["mismatch"] if notice.status is Status.MISMATCH else words["success"]
    if notice.late and notice.status is Status.SUCCESS:
        title = words["late_cancelled" if notice.previous_status is Status.CANCELLED else "late"]
    metadata = notice.metadata if isinstance(notice.metadata, dict) else {}
    at = _paid_at(notice).astimezone(PHNOM_PENH).strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        title,
        f"{words['amount']}: {_amount(data.get('amount'), currency)} {currency or ''}".rstrip(),
        f"{words['to']}: {data.get('toAccountId') or '-'}",
        f"{words['from']}: {data.get('fromAccountId') or '-'}",
    ]
    if notice.bill_number:
        lines.append(f"{words['bill']}: {notice.bill_number}")
    if metadata.get("orderId") is not None:
        lines.append(f"{words['order']}: {metadata['orderId']}")
    lines.append(f"{words['time']}: {at} (Asia/Phnom_Penh)")
    if notice.status is Status.MISMATCH and notice.reason:
        lines.append(f"{words['reason']}: {notice.reason}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class BotAnswer:
    status: int | None
    error: str | None
    body: str | None
    retry_after_s: float | None


def read_answer(status: int, body: bytes) -> BotAnswer:
    """The Bot API's answer: its `description` as the error, `parameters.retry_after`."""
    text = body[:RESPONSE_BODY_LIMIT].decode("utf-8", "replace")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    parsed = parsed if isinstance(parsed, dict) else {}
    ok = 200 <= status < 300 and parsed.get("ok", True) is not False
    retry_after = (parsed.get("parameters") or {}).get("retry_after")
    if not isinstance(retry_after, int | float) or isinstance(retry_after, bool):
        retry_after = None
    description = parsed.get("description")
    error = None if ok else str(description or f"HTTP {status}")
    return BotAnswer(status, error, text, float(retry_after) if retry_after is not None else None)


class BotApi:
    """sendMessage of one bot, over a session of its own; the token stays in here."""

    def __init__(self, api_url: str, token: str) -> None:
        self._url = f"{api_url.rstrip('/')}/bot{token}/sendMessage"
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    def scrub(self, text: str) -> str:
        """`text` without the bot token, which an error naming the URL would carry."""
        return text.replace(self._token, "<token>")

    async def send(self, chat_id: str, text: str) -> BotAnswer:
        try:
            async with self.session.post(self._url, json={"chat_id": chat_id, "text": text}) as r:
                return read_answer(r.status, await r.content.read(RESPONSE_BODY_LIMIT))
        except (aiohttp.ClientError, TimeoutError) as exc:
            return BotAnswer(None, self.scrub(f"{type(exc).__name__}: {exc}"), None, None)

    async def sent(self, chat_id: str, text: str) -> bool:
        """`send`, saying only whether it arrived (what operator alerts need)."""
        answer = await self.send(chat_id, text)
        if answer.error is not None:
            log.warning("telegram message not sent: %s", answer.error)
        return answer.error is None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_S)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class Notifier:
    """The Telegram lane: its own tick, table, lease and HTTP sessions, so that a slow or
    refusing Bot API never delays a webhook. The default app's payments go to
    TELEGRAM_CHAT_ID through TELEGRAM_BOT_TOKEN's bot; each other app's to its own chat
    through its own bot."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        bot: BotApi | None,
        chat_id: str | None,
        language: str,
        retry_schedule: Sequence[float],
        api_url: str,
    ) -> None:
        self.pool = pool
        self.bot = bot
        self.chat_id = chat_id if bot is not None else None
        self.language = language
        self.retry_schedule = tuple(retry_schedule)
        self.api_url = api_url
        self._since: datetime | None = None
        self._apps: dict[str, AppChat] = {}  # the other apps told on Telegram, as last read
        self._bots: dict[str, BotApi] = {}  # token to its bot
        self._idle_until = 0.0  # no chat anywhere: the apps are asked again from then

    async def tick(self) -> None:
        """Make the notices of new payments, then send what is due."""
        if time.monotonic() < self._idle_until:
            return
        chats = await self._chats()
        if not chats:
            # A gateway without Telegram asks its apps every IDLE_S, not every tick; an app
            # given a chat meanwhile misses nothing (the first sweep looks back).
            self._idle_until = time.monotonic() + IDLE_S
            return
        if self._since is None:
            self._since = await store.sweep_start(self.pool)
        swept_at = datetime.now(UTC)
        await store.make_notices(self.pool, chats, self._since)
        self._since = swept_at - timedelta(seconds=store.SWEEP_OVERLAP_S)
        due = await store.claim(self.pool, LEASE_S)
        if due:
            attempts = await asyncio.gather(*(self._send(n) for n in due))
            await store.record(self.pool, attempts)

    async def _chats(self) -> dict[str, str]:
        """Each app told on Telegram, to its chat; the others' bots and languages kept for
        sending."""
        found = await store.app_chats(self.pool)
        self._apps = {c.app_id: c for c in found if c.app_id != DEFAULT_APP_ID}
        await self._close_unused_bots()
        chats = {DEFAULT_APP_ID: self.chat_id} if self.chat_id else {}
        chats.update({app_id: c.chat_id for app_id, c in self._apps.items()})
        return chats

    def _bot_of(self, app_id: str) -> BotApi | None:
        if app_id == DEFAULT_APP_ID:
            return self.bot
        app = self._apps.get(app_id)
        if app is None:
            return None
        bot = self._bots.get(app.bot_token)
        if bot is None:
            bot = self._bots[app.bot_token] = BotApi(self.api_url, app.bot_token)
        return bot

    async def _close_unused_bots(self) -> None:
        """Close the session of a bot no app uses any more (its token changed or was
        removed); a tick sends nothing between reading the tokens and its sends."""
        used = {app.bot_token for app in self._apps.values()}
        for token in [t for t in self._bots if t not in used]:
            await self._bots.pop(token).close()

    async def close(self) -> None:
        """Close the apps' bots (the default app's is the service's to close)."""
        for bot in self._bots.values():
            await bot.close()

    async def _send(self, notice: DueNotice) -> NoticeAttempt:
        started = datetime.now(UTC)
        clock = time.monotonic()
        bot = self._bot_of(notice.app_id)
        if bot is None:  # the app's Telegram was removed since: nobody to tell
            answer = BotAnswer(None, "the app has no Telegram bot any more", None, None)
        else:
            app = self._apps.get(notice.app_id)
            language = app.language if app is not None else self.language
            answer = await bot.send(notice.chat_id, message_text(notice, language))
        duration_ms = times.seconds_to_ms(time.monotonic() - clock)
        return self._outcome(notice, answer, started, duration_ms)

    def _outcome(
        self, notice: DueNotice, answer: BotAnswer, started: datetime, duration_ms: int
    ) -> NoticeAttempt:
        attempt = notice.attempt_count + 1
        failed = self._gives_up(answer, attempt)
        next_at = None
        if answer.error is not None and not failed:
            next_at = datetime.now(UTC) + timedelta(seconds=self._delay_s(answer, attempt))
        if failed:
            log.warning("telegram notice stopped: %s", answer.error, extra={"noticeId": notice.id})
        elif answer.error is not None:
            log.info("telegram notice retried: %s", answer.error, extra={"noticeId": notice.id})
        answered = (answer.status, answer.error, answer.body)
        return NoticeAttempt(notice.id, attempt, started, duration_ms, *answered, next_at, failed)

    def _gives_up(self, answer: BotAnswer, attempt: int) -> bool:
        """A final refusal, or a failed last attempt that Telegram did not ask to repeat."""
        if answer.status in FINAL_STATUSES:
            return True
        spent = attempt > len(self.retry_schedule)
        return answer.error is not None and answer.retry_after_s is None and spent

    def _delay_s(self, answer: BotAnswer, attempt: int) -> float:
        """Telegram's `retry_after` (bounded), else the retry schedule's next step."""
        if answer.retry_after_s is not None:
            return min(answer.retry_after_s, RETRY_AFTER_MAX_S)
        return self.retry_schedule[min(attempt, len(self.retry_schedule)) - 1]
