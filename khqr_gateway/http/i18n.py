"""The payment page's words in English and Khmer, which of them a request wants, and amounts."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

ENGLISH = "en"
KHMER = "km"
LANGUAGES = (ENGLISH, KHMER)
# How each language names itself on the page's switch.
NATIVE_NAMES = {ENGLISH: "English", KHMER: "ខ្មែរ"}
# `{name}` is filled in by the server (str.format) and by pay.js alike; the page hands pay.js
# its language's catalogue (data-text), so the two never say different things.
TEXT: dict[str, dict[str, str]] = {
    ENGLISH: {
        "title": "Pay {merchant}",
        "the_merchant": "the merchant",
        "status.pending": "Waiting for payment\u2026",
        "status.success": "Paid. Thank you!",
        "status.failed": "The payment failed",
        "status.timeout": "This QR code has expired",
        "status.mismatch": "The payment did not match this request",
        "status.cancelled": "This payment was cancelled",
        "next.failed": "Bakong reports this payment as failed. To pay, ask {merchant} for a new "
        "QR code.",
        "next.timeout": "This QR code can no longer be paid. To pay, ask {merchant} for a new one.",
        "next.mismatch": "Your payment did not match this request (amount, currency or account). "
        "Please contact {merchant}, quoting reference {reference}.",
        "next.cancelled": "{merchant} cancelled this payment. Ask them for a new QR code if you "
        "still want to pay.",
        "bill": "Bill number",
        "reference": "Reference",
        "expires_in": "Expires in",
        "qr_label": "KHQR code of {amount} to {merchant}",
        "open_bakong": "Open in Bakong",
        "save_qr": "Save QR image",
        "how_with_link": "Paying on this phone? Tap \u201cOpen in Bakong\u201d, or save the QR "
        "image and open it with \u201cScan from gallery\u201d in your bank app.",
        "how": "Paying on this phone? Save the QR image, then open it with \u201cScan from "
        "gallery\u201d in your bank app.",
        "saved": "QR image saved. In your bank app, scan it from your gallery.",
        "scan": "Scan with a KHQR banking app (Bakong, ABA, ACLEDA, Wing and others)",
        "card_scan": "Scan or open from gallery in any KHQR banking app",
        "receipt_to": "{amount} to {merchant}",
        "phnom_penh": "(Phnom Penh)",
        "bakong_hash": "Bakong hash {hash}",
        "language": "Language",
        "sandbox": "Sandbox: no real money moves.",
        "simulate_pay": "Simulate payment",
        "simulate_fail": "Simulate failure",
        "simulate_error": "The simulated Bakong did not answer: {error}",
    },
    KHMER: {
        "title": "ទូទាត់ឱ្យ {merchant}",
        "the_merchant": "អ្នកលក់",
        "status.pending": "កំពុងរង់ចាំការទូទាត់\u2026",
        "status.success": "បានទូទាត់រួចរាល់។ សូមអរគុណ!",
        "status.failed": "ការទូទាត់បានបរាជ័យ",
        "status.timeout": "កូដ QR នេះផុតកំណត់ហើយ",
        "status.mismatch": "ការទូទាត់មិនត្រូវនឹងសំណើនេះទេ",
        "status.cancelled": "ការទូទាត់នេះត្រូវបានលុបចោល",
        "next.failed": "Bakong រាយការណ៍ថាការទូទាត់នេះបានបរាជ័យ។ ដើម្បីទូទាត់ សូមស្នើសុំកូដ QR ថ្មីពី {merchant}។",
        "next.timeout": "កូដ QR នេះមិនអាចទូទាត់បានទៀតទេ។ ដើម្បីទូទាត់ សូមស្នើសុំកូដថ្មីពី {merchant}។",
        "next.mismatch": "ការទូទាត់របស់អ្នកមិនត្រូវនឹងសំណើនេះទេ (ចំនួនទឹកប្រាក់ រូបិយប័ណ្ណ "
        "ឬគណនី)។ សូមទាក់ទង {merchant} ដោយប្រាប់លេខយោង {reference}។",
        "next.cancelled": "{merchant} បានលុបចោលការទូទាត់នេះ។ ប្រសិនបើអ្នកនៅតែចង់ទូទាត់ សូមស្នើសុំកូដ QR ថ្មី។",
        "bill": "លេខវិក្កយបត្រ",
        "reference": "លេខយោង",
        "expires_in": "ផុតកំណត់ក្នុងរយៈពេល",
        "qr_label": "កូដ KHQR ចំនួន {amount} ទៅ {merchant}",
        "open_bakong": "បើកក្នុង Bakong",
        "save_qr": "រក្សាទុករូបភាព QR",
        "how_with_link": "ទូទាត់នៅលើទូរស័ព្ទនេះ? ចុច «បើកក្នុង Bakong» ឬរក្សាទុករូបភាព QR "
        "រួចបើកវាតាម «ស្កេនពីរូបភាព» ក្នុងកម្មវិធីធនាគាររបស់អ្នក។",
        "how": "ទូទាត់នៅលើទូរស័ព្ទនេះ? រក្សាទុករូបភាព QR រួចបើកវាតាម «ស្កេនពីរូបភាព» ក្នុងកម្មវិធីធនាគាររបស់អ្នក។",
        "saved": "បានរក្សាទុករូបភាព QR។ ក្នុងកម្មវិធីធនាគារ សូមស្កេនវាពីរូបភាពរបស់អ្នក។",
        "scan": "ស្កេនដោយកម្មវិធីធនាគារដែលគាំទ្រ KHQR (Bakong, ABA, ACLEDA, Wing និងផ្សេងៗទៀត)",
        "card_scan": "ស្កេន ឬបើកពីរូបភាព ក្នុងកម្មវិធីធនាគារណាមួយដែលគាំទ្រ KHQR",
        "receipt_to": "{amount} ទៅ {merchant}",
        "phnom_penh": "(ភ្នំពេញ)",
        "bakong_hash": "Bakong hash {hash}",
        "language": "ភាសា",
        "sandbox": "Sandbox៖ គ្មានប្រាក់ពិតត្រូវបានផ្ទេរទេ។",
        "simulate_pay": "សាកល្បងការទូទាត់",
        "simulate_fail": "សាកល្បងការបរាជ័យ",
        "simulate_error": "Bakong សាកល្បងមិនបានឆ្លើយតប៖ {error}",
    },
}


def language(asked: str | None, accept_language: str | None) -> str:
    """`?lang=` when it names one of ours, else the Accept-Language header's best, else English."""
    if asked is not None and asked.lower() in LANGUAGES:
        return asked.lower()
    best, best_q = ENGLISH, 0.0
    # A few dozen entries are more than any browser sends; a longer header is not read on.
    for item in (accept_language or "").split(",")[:32]:
        tag, _, params = item.strip().partition(";")
        primary = tag.strip().split("-")[0].lower()
        quality = _quality(params)
        # Equal weights keep the header's order: the first one listed wins.
        if primary in LANGUAGES and quality > best_q:
            best, best_q = primary, quality
    return best


def _quality(params: str) -> float:
    name, _, value = params.strip().partition("=")
    if name.strip().lower() != "q":
        return 1.0
    try:
        quality = float(value)
    except ValueError:
        return 0.0
    return quality if 0.0 <= quality <= 1.0 else 0.0


def say(lang: str, key: str, **values: Any) -> str:
    return TEXT[lang][key].format(**values) if values else TEXT[lang][key]


def amount_number(amount: Any, currency: str | None) -> str:
    """An amount as the page writes it: `1.00` (USD), `10,000` (KHR, whole riel)."""
    try:
        value = Decimal(str(amount))
    except (InvalidOperation, ValueError):
        return str(amount)
    if not value.is_finite():
        return str(amount)
    return f"{value:,.0f}" if currency == "KHR" else f"{value:,.2f}"


def amount_text(amount: Any, currency: str | None) -> str:
    """`1.00 USD`, `10,000 KHR`: the page's header, its receipt and the saved QR image alike."""
    return f"{amount_number(amount, currency)} {currency or ''}".strip()
