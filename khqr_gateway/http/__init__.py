"""HTTP API handlers and schemas; the keys the factory and the middlewares set."""

from __future__ import annotations

from aiohttp import web

from khqr_gateway.apps.model import Caller
from khqr_gateway.config import Settings

SETTINGS_KEY = web.AppKey("settings", Settings)
REQUEST_ID = web.RequestKey("request_id", str)
CALLER = web.RequestKey("caller", Caller)
