"""HTTP API handlers and schemas; the request keys the middlewares set."""

from __future__ import annotations

from aiohttp import web

REQUEST_ID = web.RequestKey("request_id", str)
API_KEY_ID = web.RequestKey("api_key_id", str)
