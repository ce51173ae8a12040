"""QR code images of a KHQR string: a data URL for the API, an inline SVG for pages."""

from __future__ import annotations

import base64
import io
from functools import lru_cache

import segno

IMAGE_TYPES = {"svg": "image/svg+xml", "png": "image/png"}
# Payment pages drawn at once: the QR of each is drawn once (8 ms of CPU, several KB each);
# without it every view of a page drew it again, and a link open on many screens slowed the
# whole process.
QR_CACHE_SIZE = 1024


def qr_image(qr: str, kind: str) -> str:
    """The QR code of `qr` as a data URL (SVG or PNG)."""
    buffer = io.BytesIO()
    segno.make_qr(qr, error="m").save(buffer, kind=kind, scale=8, border=4)
    return f"data:{IMAGE_TYPES[kind]};base64,{base64.b64encode(buffer.getvalue()).decode()}"


@lru_cache(maxsize=QR_CACHE_SIZE)
def qr_svg_inline(qr: str) -> str:
    """The QR code of `qr` as an <svg> element that scales to its box (for HTML pages)."""
    svg: str = segno.make_qr(qr, error="m").svg_inline(scale=1, border=4, omitsize=True)
    return svg
