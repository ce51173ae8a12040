"""The static files the app serves (pages, scripts, styles) and the headers pages go out with."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def read(name: str) -> bytes:
    """A file of khqr_gateway/static, read once."""
    return resources.files("khqr_gateway").joinpath("static", name).read_bytes()


def page_headers(content_type: str, csp: str) -> dict[str, str]:
    """A page under its Content-Security-Policy, never cached, never sent on as a Referer
    (a page URL may carry its access token)."""
    return {
        "Content-Type": content_type,
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
