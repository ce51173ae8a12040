"""KHQR (EMVCo merchant-presented QR) codec: build, parse, verify, CRC and md5, with no I/O."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from khqr_gateway import times

__all__ = [
    "DEFAULT_CITY",
    "Khqr",
    "KhqrError",
    "build",
    "crc16",
    "md5_of",
    "parse",
    "utf16_length",
    "verify",
]

_CRC_HEADER = "6304"
_MAX_VALUE_LENGTH = 99  # two length digits
_MAX_AMOUNT_LENGTH = 13
_CURRENCY_CODES = {"KHR": "116", "USD": "840"}
_ACCOUNT_TAGS = {"individual": "29", "merchant": "30"}

_CURRENCY_NAMES = {code: name for name, code in _CURRENCY_CODES.items()}
_MERCHANT_TYPES = {tag: name for name, tag in _ACCOUNT_TAGS.items()}
_REQUIRED_TAGS = ("00", "01", "52", "53", "58", "59", "60")
_TWO_DIGITS = re.compile(r"[0-9]{2}")
_MCC = re.compile(r"[0-9]{4}")
_DIGITS = re.compile(r"[0-9]+")
_HEX4 = re.compile(r"[0-9A-F]{4}")
# What a KHQR amount may look like; published examples include "1.0" and "5000.0".
_PARSED_AMOUNT = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_INPUT_AMOUNT = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_CENT = Decimal("0.01")
_EPOCH_MS_MIN = 10**12  # 13-digit epoch milliseconds: 2001-09-09 ...
_EPOCH_MS_MAX = 10**13 - 1  # ... to 2286-11-20
_EPOCH_MS = re.compile(r"[0-9]{13}")
_COUNTRY = "KH"
# A QR's merchant city when none is given (the official SDK's default).
DEFAULT_CITY = "Phnom Penh"
# Each text field's limit in UTF-16 units, for build and verify alike (the SDK's limits).
_LIMITS = {
    "merchant_name": 25,
    "merchant_city": 15,
    "account_id": 32,
    "account_information": 32,
    "acquiring_bank": 32,
    "bill_number": 25,
    "mobile_number": 25,
    "store_label": 25,
    "terminal_label": 25,
    "purpose": 25,
    "language_preference": 2,
    "merchant_name_alternate": 25,
    "merchant_city_alternate": 15,
}


class KhqrError(ValueError):
    """A KHQR string or build request that is not valid; ``rule`` names what it breaks."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


def utf16_length(text: str) -> int:
    """Length in UTF-16 units, as KHQR lengths and limits count (the SDK is JavaScript)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: str) -> str:
    """CRC-16/CCITT-FALSE of the UTF-8 bytes of ``data``, as 4 uppercase hex digits."""
    crc = 0xFFFF
    for byte in data.encode("utf-8"):
        crc = ((crc << 8) & 0xFFFF) ^ _CRC_TABLE[(crc >> 8) ^ byte]
    return f"{crc:04X}"


def md5_of(qr: str) -> str:
    """Lowercase hex MD5 of the whole KHQR string: Bakong's handle for the payment."""
    # Not a security use; the flag keeps md5 available on FIPS-mode Pythons.
    return hashlib.md5(qr.encode("utf-8"), usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class Khqr:
    """A parsed KHQR string; ``fields`` keeps every top-level tag's raw value."""

    raw: str
    md5: str
    dynamic: bool
    account_id: str
    merchant_type: str
    account_information: str | None
    acquiring_bank: str | None
    merchant_category_code: str
    currency: str
    amount: Decimal | None
    country_code: str
    merchant_name: str
    merchant_city: str
    bill_number: str | None
    mobile_number: str | None
    store_label: str | None
    terminal_label: str | None
    purpose: str | None
    language_preference: str | None
    merchant_name_alternate: str | None
    merchant_city_alternate: str | None
    created_at_ms: int | None
    expires_at_ms: int | None
    # Left out of the hash so a Khqr stays hashable; raw already determines it.
    fields: dict[str, str] = field(hash=False)


# Parsing


def parse(qr: str) -> Khqr:
    """Parse and validate a KHQR string (structure, CRC, required tags).

    Lengths count UTF-16 units, as the official SDK writes them. Surrounding whitespace is
    ignored. Lenient on purpose, for readers of stored QRs: dynamic QRs from before tag 99
    carried an expiry parse, with ``expires_at_ms`` None. ``verify`` is the strict step.
    Raises KhqrError.
    """
    text = qr.strip()
    if not text:
        raise KhqrError("KHQR string is empty", "qr.empty")
    _require_utf8(text, "KHQR string")
    fields = _read_tlv(text, "KHQR string")
    _check_crc(text, fields)
    _check_header(fields)
    account_tag, account = _account_template(fields)
    extra = _sub_fields(fields, "62")
    language = _sub_fields(fields, "64")
    stamps = _sub_fields(fields, "99")
    return Khqr(
        raw=text,
        md5=md5_of(text),
        dynamic=fields["01"] == "12",
        account_id=account["00"],
        merchant_type=_MERCHANT_TYPES[account_tag],
        account_information=account.get("01"),
        acquiring_bank=account.get("02"),
        merchant_category_code=fields["52"],
        currency=_parse_currency(fields["53"]),
        amount=_parse_amount(fields.get("54")),
        country_code=fields["58"],
        merchant_name=fields["59"],
        merchant_city=fields["60"],
        bill_number=extra.get("01"),
        mobile_number=extra.get("02"),
        store_label=extra.get("03"),
        terminal_label=extra.get("07"),
        purpose=extra.get("08"),
        language_preference=language.get("00"),
        merchant_name_alternate=language.get("01"),
        merchant_city_alternate=language.get("02"),
        created_at_ms=_parse_epoch_ms(stamps.get("00"), "created_at"),
        expires_at_ms=_parse_epoch_ms(stamps.get("01"), "expires_at"),
        fields=fields,
    )


def _require_utf8(text: str, what: str, rule: str = "qr.unicode") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KhqrError(f"{what} is not valid Unicode text: {exc.reason}", rule) from None


def _read_tlv(data: str, where: str) -> dict[str, str]:
    """Split tag(2) + length(2, in UTF-16 units) + value fields, in order."""
    units = data.encode("utf-16-le")
    fields: dict[str, str] = {}
    pos, size = 0, len(units) // 2
    while pos < size:
        head = units[2 * pos : 2 * pos + 8].decode("utf-16-le", "surrogatepass")
        tag, length = head[:2], head[2:]
        if not (_TWO_DIGITS.fullmatch(tag) and _TWO_DIGITS.fullmatch(length)):
            raise KhqrError(
                f"{where}: expected a 2-digit tag and 2-digit length at position {pos}, "
                f"got {head!r}",
                "qr.tlv",
            )
        end = pos + 4 + int(length)
        if end > size:
            raise KhqrError(
                f"{where}: tag {tag} claims {int(length)} characters "
                f"but only {size - pos - 4} remain",
                "qr.tlv",
            )
        if tag in fields:
            raise KhqrError(f"{where}: tag {tag} appears more than once", "qr.tlv")
        fields[tag] = _value(units[2 * (pos + 4) : 2 * end], where, tag)
        pos = end
    return fields


def _value(units: bytes, where: str, tag: str) -> str:
    try:
        return units.decode("utf-16-le")
    except UnicodeDecodeError:
        # A length counted in code points, not UTF-16 units, cuts an emoji in half.
        raise KhqrError(
            f"{where}: tag {tag}'s length ends inside a character; "
            "KHQR lengths count UTF-16 units (an emoji is 2)",
            "qr.tlv",
        ) from None


def _check_crc(text: str, fields: dict[str, str]) -> None:
    if next(reversed(fields)) != "63":
        where = "missing" if "63" not in fields else "not the last field"
        raise KhqrError(f"CRC (tag 63) is {where}; it must end the string", "crc")
    stated = fields["63"]
    if not _HEX4.fullmatch(stated):
        raise KhqrError(f"CRC (tag 63) {stated!r} is not 4 uppercase hex digits", "crc")
    expected = crc16(text[:-4])
    if stated != expected:
        raise KhqrError(f"CRC mismatch: string says {stated}, content gives {expected}", "crc")


def _check_header(fields: dict[str, str]) -> None:
    missing = [tag for tag in _REQUIRED_TAGS if tag not in fields]
    if missing:
        raise KhqrError(f"required tag(s) missing: {', '.join(missing)}", "qr.required_tag")
    if next(iter(fields)) != "00" or fields["00"] != "01":
        raise KhqrError(
            "payload format indicator (tag 00) must come first and be '01'", "payload_format"
        )
    if fields["01"] not in ("11", "12"):
        raise KhqrError(
            f"point of initiation (tag 01) must be 11 or 12, got {fields['01']!r}",
            "point_of_initiation",
        )


def _account_template(fields: dict[str, str]) -> tuple[str, dict[str, str]]:
    present = [tag for tag in _ACCOUNT_TAGS.values() if tag in fields]
    if len(present) != 1:
        raise KhqrError(
            "exactly one account template (tag 29 or 30) is required", "account.template"
        )
    tag = present[0]
    account = _sub_fields(fields, tag)
    account_id = account.get("00")
    if account_id is None or not _is_account_id(account_id):
        raise KhqrError(
            f"tag {tag}.00 must hold a Bakong account id like 'name@bank'", "account_id.format"
        )
    return tag, account


def _sub_fields(fields: dict[str, str], tag: str) -> dict[str, str]:
    value = fields.get(tag)
    return {} if value is None else _read_tlv(value, f"tag {tag}")


def _parse_currency(code: str) -> str:
    name = _CURRENCY_NAMES.get(code)
    if name is None:
        raise KhqrError(
            f"currency (tag 53) must be 116 (KHR) or 840 (USD), got {code!r}",
            "currency.unsupported",
        )
    return name


def _parse_amount(value: str | None) -> Decimal | None:
    if value is None:
        return None
    if not _PARSED_AMOUNT.fullmatch(value):
        raise KhqrError(f"amount (tag 54) {value!r} is not a decimal number", "amount.format")
    return Decimal(value)


def _parse_epoch_ms(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not _DIGITS.fullmatch(value):
        raise KhqrError(f"{name} (tag 99) {value!r} is not epoch milliseconds", f"{name}.format")
    return int(value)


def _is_account_id(value: str) -> bool:
    name, at, bank = value.partition("@")
    return bool(name and at and bank)


# Verifying: the rules payer apps apply to a scanned QR


def verify(qr: str, *, now_ms: int | None = None) -> Khqr:
    """Parse ``qr`` and apply every rule payer apps do; raises KhqrError naming the rule.

    The official SDK's verify (bakong-khqr 1.0.20) and the NBC sheet: text fields within
    their lengths (UTF-16 units) and not empty, a 4-digit MCC, country KH; an amount
    (non-zero, at most 13 characters) and tag 99 with 13-digit creation and expiry for a
    dynamic QR, the expiry after the creation and after ``now_ms`` (default: now).
    """
    khqr = parse(qr)
    _check_texts(khqr)
    _check_templates(khqr.fields)
    _check_language(khqr)
    _check_codes(khqr)
    _check_amount(khqr)
    _check_timestamps(khqr, times.now_ms() if now_ms is None else now_ms)
    return khqr


def _check_texts(khqr: Khqr) -> None:
    for name, limit in _LIMITS.items():
        value: str | None = getattr(khqr, name)
        if value is not None:
            _check_length(name, value, limit)


def _check_length(name: str, value: str, limit: int) -> None:
    if not value:
        raise KhqrError(f"{name} is empty", f"{name}.empty")
    length = utf16_length(value)
    if length > limit:
        raise KhqrError(
            f"{name} is {length} UTF-16 units long (an emoji counts 2); at most {limit} allowed",
            f"{name}.length",
        )


def _check_templates(fields: dict[str, str]) -> None:
    for tag, name in (("62", "additional_data"), ("64", "language_template")):
        if fields.get(tag) == "":
            raise KhqrError(f"{name} (tag {tag}) is empty; leave it out instead", f"{name}.empty")


def _check_language(khqr: Khqr) -> None:
    # The SDK writes and reads the preference only with the alternate name, and the reverse.
    if khqr.language_preference is not None and khqr.merchant_name_alternate is None:
        raise KhqrError(
            "tag 64 has a language_preference but no merchant_name_alternate",
            "merchant_name_alternate.required",
        )
    if khqr.merchant_name_alternate is not None and khqr.language_preference is None:
        raise KhqrError(
            "tag 64 has a merchant_name_alternate but no language_preference",
            "language_preference.required",
        )


def _check_codes(khqr: Khqr) -> None:
    code = khqr.merchant_category_code
    if not _MCC.fullmatch(code):
        raise KhqrError(
            f"merchant_category_code (tag 52) must be 4 digits, got {code!r}",
            "merchant_category_code.format",
        )
    if khqr.country_code != _COUNTRY:
        raise KhqrError(
            f"country_code (tag 58) must be {_COUNTRY}, got {khqr.country_code!r}",
            "country_code.value",
        )


def _check_amount(khqr: Khqr) -> None:
    text = khqr.fields.get("54")
    if text is None:
        if khqr.dynamic:
            raise KhqrError("a dynamic QR must carry an amount (tag 54)", "amount.required")
        return
    if len(text) > _MAX_AMOUNT_LENGTH:
        raise KhqrError(
            f"amount (tag 54) {text!r} is longer than {_MAX_AMOUNT_LENGTH} characters",
            "amount.length",
        )
    if khqr.amount == 0:
        raise KhqrError(f"amount (tag 54) {text!r} is zero", "amount.zero")


def _check_timestamps(khqr: Khqr, now_ms: int) -> None:
    if "99" not in khqr.fields:
        if khqr.dynamic or "54" in khqr.fields:
            # Payer apps refuse a QR with an amount but no expiry (SDK 1.0.18+, doc v2.8).
            raise KhqrError(
                "a dynamic QR must carry tag 99 with its creation and expiry times",
                "timestamps.required",
            )
        return
    if not khqr.dynamic:
        return
    stamps = _sub_fields(khqr.fields, "99")
    created = _epoch_ms(stamps.get("00"), "created_at", "99.00")
    expires = _epoch_ms(stamps.get("01"), "expires_at", "99.01")
    if expires <= created:
        raise KhqrError(
            f"expires_at {expires} is not after created_at {created}", "expires_at.order"
        )
    if expires <= now_ms:
        raise KhqrError(f"the QR expired at {expires} (now {now_ms})", "expires_at.past")


def _epoch_ms(text: str | None, name: str, tag: str) -> int:
    if text is None:
        raise KhqrError(f"a dynamic QR must carry {name} (tag {tag})", f"{name}.required")
    if not _EPOCH_MS.fullmatch(text):
        raise KhqrError(
            f"{name} (tag {tag}) must be 13-digit epoch milliseconds, got {text!r}",
            f"{name}.format",
        )
    return int(text)


# Building


def build(
    *,
    account_id: str,
    merchant_name: str,
    merchant_city: str = DEFAULT_CITY,
    amount: Decimal | int | str | None = None,
    currency: str = "KHR",
    dynamic: bool | None = None,
    merchant_type: str = "individual",
    account_information: str | None = None,
    acquiring_bank: str | None = None,
    merchant_category_code: str = "5999",
    bill_number: str | None = None,
    mobile_number: str | None = None,
    store_label: str | None = None,
    terminal_label: str | None = None,
    purpose: str | None = None,
    created_at_ms: int | None = None,
    expires_at_ms: int | None = None,
    language_preference: str | None = None,
    merchant_name_alternate: str | None = None,
    merchant_city_alternate: str | None = None,
) -> str:
    """Build a KHQR string, exactly as the official SDK's generate does from the same fields
    and times; raises KhqrError naming the first invalid field.

    A QR is dynamic exactly when it has an amount, as the SDK makes it (``dynamic``, if
    given, must agree). Dynamic QRs need ``expires_at_ms``; ``created_at_ms`` defaults to now.
    """
    currency = _currency_name(currency)
    is_dynamic = _is_dynamic(amount, dynamic)
    _check_language_pair(language_preference, merchant_name_alternate)
    body = "".join(
        (
            _tlv("00", "01"),
            _tlv("01", "12" if is_dynamic else "11"),
            _account_field(merchant_type, account_id, account_information, acquiring_bank),
            _tlv("52", _mcc(merchant_category_code)),
            _tlv("53", _CURRENCY_CODES[currency]),
            "" if amount is None else _tlv("54", _format_amount(amount, currency)),
            _tlv("58", _COUNTRY),
            _tlv("59", _text("merchant_name", merchant_name)),
            _tlv("60", _text("merchant_city", merchant_city)),
            _template(
                "62",
                [
                    ("01", "bill_number", bill_number),
                    ("02", "mobile_number", mobile_number),
                    ("03", "store_label", store_label),
                    ("07", "terminal_label", terminal_label),
                    ("08", "purpose", purpose),
                ],
            ),
            _template(
                "64",
                [
                    ("00", "language_preference", language_preference),
                    ("01", "merchant_name_alternate", merchant_name_alternate),
                    ("02", "merchant_city_alternate", merchant_city_alternate),
                ],
            ),
            _timestamps(is_dynamic, created_at_ms, expires_at_ms),
            _CRC_HEADER,
        )
    )
    return body + crc16(body)


def _is_dynamic(amount: object, dynamic: bool | None) -> bool:
    has_amount = amount is not None
    # Payer apps refuse a dynamic QR without an amount and an amount without an expiry.
    if dynamic is not None and dynamic != has_amount:
        raise KhqrError(
            "a dynamic QR needs an amount and a static QR has none (dynamic "
            f"{dynamic}, amount {amount!r}): payer apps refuse anything else",
            "amount.required" if dynamic else "amount.static",
        )
    return has_amount


def _check_language_pair(preference: str | None, name: str | None) -> None:
    if (preference is None) != (name is None):
        missing = "merchant_name_alternate" if name is None else "language_preference"
        raise KhqrError(
            "language_preference and merchant_name_alternate go together in tag 64",
            f"{missing}.required",
        )


def _format_amount(amount: Decimal | int | str, currency: str) -> str:
    """Write an amount as the official SDK does: KHR whole, USD ``1.50`` / ``10``."""
    value = _to_decimal(amount)
    if not value.is_finite() or value <= 0:
        raise KhqrError(f"amount must be a positive number, got {amount!r}", "amount.zero")
    if value.adjusted() >= _MAX_AMOUNT_LENGTH:
        raise KhqrError(
            f"amount {amount!r} is longer than {_MAX_AMOUNT_LENGTH} characters", "amount.length"
        )
    if value == value.to_integral_value():
        text = str(int(value))
    elif currency == "KHR":
        raise KhqrError(
            f"KHR amount must be a whole number of riel, got {amount!r}", "amount.format"
        )
    elif value != value.quantize(_CENT):
        raise KhqrError(f"USD amount has at most 2 decimals, got {amount!r}", "amount.format")
    else:
        text = f"{value:.2f}"
    if len(text) > _MAX_AMOUNT_LENGTH:
        raise KhqrError(
            f"amount {text} is longer than {_MAX_AMOUNT_LENGTH} characters", "amount.length"
        )
    return text


def _to_decimal(amount: object) -> Decimal:
    if isinstance(amount, Decimal):
        return amount
    if isinstance(amount, int) and not isinstance(amount, bool):
        return Decimal(amount)
    if isinstance(amount, str) and _INPUT_AMOUNT.fullmatch(amount.strip()):
        return Decimal(amount.strip())
    # Floats are refused: a binary float cannot hold most cent values exactly.
    raise KhqrError(
        f"amount must be a Decimal, an int or a plain decimal string, got {amount!r}",
        "amount.format",
    )


def _currency_name(currency: str) -> str:
    name = currency.upper() if isinstance(currency, str) else ""
    if name not in _CURRENCY_CODES:
        raise KhqrError(f"currency must be KHR or USD, got {currency!r}", "currency.unsupported")
    return name


def _mcc(code: str) -> str:
    if not isinstance(code, str) or not _MCC.fullmatch(code):
        raise KhqrError(
            f"merchant_category_code must be 4 digits, got {code!r}",
            "merchant_category_code.format",
        )
    return code


def _account_field(
    merchant_type: str, account_id: str, information: str | None, bank: str | None
) -> str:
    tag = _ACCOUNT_TAGS.get(merchant_type)
    if tag is None:
        raise KhqrError(
            f"merchant_type must be 'individual' or 'merchant', got {merchant_type!r}",
            "merchant_type.value",
        )
    if not isinstance(account_id, str) or not _is_account_id(account_id):
        raise KhqrError(
            f"account_id must look like 'name@bank', got {account_id!r}", "account_id.format"
        )
    # The official SDK refuses merchant (tag 30) QRs without these two.
    if merchant_type == "merchant" and (information is None or bank is None):
        raise KhqrError(
            "a merchant QR needs account_information (merchant id) and acquiring_bank",
            "account_information.required" if information is None else "acquiring_bank.required",
        )
    return _template(
        tag,
        [
            ("00", "account_id", account_id),
            ("01", "account_information", information),
            ("02", "acquiring_bank", bank),
        ],
    )


def _template(tag: str, entries: Sequence[tuple[str, str, str | None]]) -> str:
    """A nested template of the entries that are set; empty when none are."""
    body = "".join(
        _tlv(sub_tag, _text(name, value)) for sub_tag, name, value in entries if value is not None
    )
    return _tlv(tag, body) if body else ""


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise KhqrError(f"{name} must be a string, got {type(value).__name__}", f"{name}.format")
    _require_utf8(value, name, f"{name}.format")
    if not value:
        raise KhqrError(f"{name} is empty; pass None to leave it out", f"{name}.empty")
    _check_length(name, value, _LIMITS[name])
    return value


def _tlv(tag: str, value: str) -> str:
    length = utf16_length(value)
    if length > _MAX_VALUE_LENGTH:
        raise KhqrError(
            f"tag {tag} would hold {length} UTF-16 units; at most {_MAX_VALUE_LENGTH} fit",
            f"tag_{tag}.length",
        )
    return f"{tag}{length:02d}{value}"


def _timestamps(dynamic: bool, created_at_ms: int | None, expires_at_ms: int | None) -> str:
    if not dynamic:
        if created_at_ms is not None or expires_at_ms is not None:
            raise KhqrError(
                "created_at_ms and expires_at_ms apply only to a dynamic QR", "timestamps.static"
            )
        return ""
    if expires_at_ms is None:
        # Payer apps reject dynamic QRs without an expiry (SDK 1.0.18+, doc v2.8).
        raise KhqrError("expires_at_ms is required for a dynamic QR", "expires_at.required")
    created = times.now_ms() if created_at_ms is None else created_at_ms
    _check_epoch_ms("created_at", created)
    _check_epoch_ms("expires_at", expires_at_ms)
    if expires_at_ms <= created:
        raise KhqrError(
            f"expires_at_ms {expires_at_ms} is not after created_at_ms {created}",
            "expires_at.order",
        )
    return _tlv("99", _tlv("00", str(created)) + _tlv("01", str(expires_at_ms)))


def _check_epoch_ms(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KhqrError(
            f"{name}_ms must be an int of epoch milliseconds, got {value!r}", f"{name}.format"
        )
    if not _EPOCH_MS_MIN <= value <= _EPOCH_MS_MAX:
        raise KhqrError(
            f"{name}_ms must be 13-digit epoch milliseconds, got {value}", f"{name}.format"
        )
