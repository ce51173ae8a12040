"""A simulated Telegram Bot API for sandbox mode: sendMessage into an inbox one can read.

Mounted at /sandbox/telegram in sandbox mode; point TELEGRAM_API_URL at it
(`http://127.0.0.1:3000/sandbox/telegram`) with any TELEGRAM_BOT_TOKEN to see the notices
a shop owner would get, at `GET /sandbox/telegram/inbox/{chatId}`. The token is never kept.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

INBOX_LIMIT = 100
TEXT_LIMIT = 4096
# A bot token as BotFather makes them: the bot's id, a colon, then the secret part.
TOKEN_PATH_RE = re.compile(r"/bot[^/]+/")


def redact_token(path: str) -> str:
    """A request path without the bot token in it, as logs may show it."""
    return TOKEN_PATH_RE.sub("/bot<token>/", path)


@dataclass
class BotInbox:
    chats: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    # Chat ids that answer as a bot blocked by its user does: to try that path.
    blocked: set[str] = field(default_factory=set)


INBOX_KEY = web.AppKey("telegram_inbox", BotInbox)


def _answer(status: int, description: str) -> web.Response:
    body = {"ok": False, "error_code": status, "description": description}
    return web.json_response(body, status=status)


async def send_message(request: web.Request) -> web.Response:
    """POST /bot{token}/sendMessage {chat_id, text}, answered as Telegram does."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _answer(400, "Bad Request: the body is not JSON")
    if not isinstance(body, dict):
        return _answer(400, "Bad Request: the body must be an object")
    chat_id, text = str(body.get("chat_id") or ""), body.get("text")
    if not chat_id:
        return _answer(400, "Bad Request: chat not found")
    if not isinstance(text, str) or not text or len(text) > TEXT_LIMIT:
        return _answer(400, "Bad Request: message text is empty or too long")
    inbox = request.app[INBOX_KEY]
    if chat_id[:64] in inbox.blocked:
        return _answer(403, "Forbidden: bot was blocked by the user")
    message = {
        "message_id": next(inbox.ids),
        "date": int(time.time()),
        "chat": {"id": chat_id},
        "text": text,
    }
    messages = inbox.chats.setdefault(chat_id[:64], [])
    messages.append(message)
    del messages[:-INBOX_LIMIT]
    return web.json_response({"ok": True, "result": message})


async def read_inbox(request: web.Request) -> web.Response:
    """GET /inbox/{chatId}: the messages sent to that chat, oldest first (the last 100)."""
    messages = request.app[INBOX_KEY].chats.get(request.match_info["chatId"][:64], [])
    return web.json_response(messages)


async def block(request: web.Request) -> web.Response:
    """POST /control/block/{chatId}: from now on that chat answers 403, as a blocked bot."""
    request.app[INBOX_KEY].blocked.add(request.match_info["chatId"][:64])
    return web.json_response({"chatId": request.match_info["chatId"][:64], "blocked": True})


def create_bot_sandbox_app() -> web.Application:
    app = web.Application()
    app[INBOX_KEY] = BotInbox()
    app.router.add_post("/bot{token}/sendMessage", send_message)
    app.router.add_get("/inbox/{chatId}", read_inbox)
    app.router.add_post("/control/block/{chatId}", block)
    return app
