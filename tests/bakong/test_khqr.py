"""Tests for the KHQR codec, against published strings and the bakong-khqr package."""

from __future__ import annotations

import time
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import bakong_khqr.sdk.timestamp
import pytest
from bakong_khqr import KHQR
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from khqr_gateway.bakong.khqr import (
    Khqr,
    KhqrError,
    build,
    crc16,
    md5_of,
    parse,
    utf16_length,
    verify,
)
from tests import khqr_sdk
from tests.khqr_sdk import Sdk

NOW_MS = 1_700_000_000_500
DAY_MS = 86_400_000
ACCOUNT = "jonhsmith@nbcq"
NAME = "Jonh Smith"
CITY = "Phnom Penh"

# KHQR strings published with their CRC (some with their md5) in the NBC KHQR SDK
# document and the READMEs of the SDK's ports, plus a production ABA merchant QR. Most
# predate the v2.8 rule that dynamic QRs carry an expiry, so they are parse-only vectors.
PUBLISHED_6894 = (
    "00020101021229180014jonhsmith@nbcq52045999530311654035005802KH5910Jonh Smith"
    "6010PHNOM PENH99170013173949577872263046894"
)
PUBLISHED_198A = (
    "00020101021229220018chamroeun_tam@wing520459995303116540710000005802KH5913Chamroeun Tam"
    "6010PHNOM PENH9917001317627644609676304198A"
)
PUBLISHED_C297 = (
    "00020101021229180014jonhsmith@nbcq52045999530384054031.05802KH5910Jonh Smith"
    "6010Phnom Penh6304C297"
)
PUBLISHED_MERCHANT = (
    "00020101021130400014jonhsmith@nbcq01061234560208Dev Bank5204599953031165802KH"
    "5910Jonh Smith6009Siem Reap6215021185512345678991700131739495778722630433E1"
)
PUBLISHED_SDK_SAMPLE = (
    "00020101021215311234567812345678ABCDEFGHIJKLMNO29460015john_smith@devb"
    "0111855122334550208Dev Bank52045999530384054031005802KH5910John Smith"
    "6010PHNOM PENH62670106#123450211855122334550311Coffee Shop0709Cashier_1"
    "0810Buy coffee64290002km0108ចន ស្មីន0207ភ្នំពេញ991700131688023959268630442A9"
)
PUBLISHED_ABA = (
    "00020101021230510016abaakhppxxx@abaa01151250212145328460208ABA Bank52045987530311654031"
    "005802KH5925OLD ME 25 CHAR WINNER IP26010Phnom Penh62570115MC-REF-KH-150006834"
    "0010PAYWAY@ABA0208104514230604A2279934001317598053453370113175980552533763049FBD"
)


def with_crc(body: str) -> str:
    """Close a body (without tag 63) with a correct CRC, to isolate other faults."""
    return body + "6304" + crc16(body + "6304")


def sample(**overrides: Any) -> str:
    kwargs: dict[str, Any] = {
        "account_id": ACCOUNT,
        "merchant_name": NAME,
        "amount": 1000,
        "created_at_ms": NOW_MS,
        "expires_at_ms": NOW_MS + DAY_MS,
    }
    return build(**(kwargs | overrides))


# CRC and md5


def test_crc16_is_ccitt_false() -> None:
    assert crc16("123456789") == "29B1"
    assert crc16("") == "FFFF"


@pytest.mark.parametrize(
    ("qr", "crc"),
    [
        (PUBLISHED_6894, "6894"),
        (PUBLISHED_198A, "198A"),
        (PUBLISHED_C297, "C297"),
        (PUBLISHED_MERCHANT, "33E1"),
        (PUBLISHED_SDK_SAMPLE, "42A9"),
        (PUBLISHED_ABA, "9FBD"),
    ],
)
def test_published_strings_have_the_published_crc_and_parse(qr: str, crc: str) -> None:
    assert crc16(qr[:-4]) == crc
    assert parse(qr).fields["63"] == crc


@pytest.mark.parametrize(
    ("qr", "md5"),
    [
        (PUBLISHED_6894, "b1c250304b8594e4c6b53dd44791b57a"),
        (PUBLISHED_198A, "31becb635939b456ad2d694242cce979"),
        (PUBLISHED_MERCHANT, "c0d2d74726f8e887f37a585cda3b3a79"),
    ],
)
def test_md5_matches_the_published_handle(qr: str, md5: str) -> None:
    assert md5_of(qr) == md5
    assert parse(qr).md5 == md5


# Parsing published strings


def test_parse_reads_every_field_of_the_sdk_sample() -> None:
    khqr = parse(PUBLISHED_SDK_SAMPLE)
    assert (khqr.dynamic, khqr.merchant_type) == (True, "individual")
    assert khqr.account_id == "john_smith@devb"
    assert (khqr.account_information, khqr.acquiring_bank) == ("85512233455", "Dev Bank")
    assert (khqr.currency, khqr.amount) == ("USD", Decimal("100"))
    assert (khqr.merchant_category_code, khqr.country_code) == ("5999", "KH")
    assert (khqr.merchant_name, khqr.merchant_city) == ("John Smith", "PHNOM PENH")
    assert khqr.bill_number == "#12345"
    assert khqr.mobile_number == "85512233455"
    assert khqr.store_label == "Coffee Shop"
    assert khqr.terminal_label == "Cashier_1"
    assert khqr.purpose == "Buy coffee"
    assert khqr.language_preference == "km"
    # 8 and 7 characters, as their length fields say, though 22 and 21 UTF-8 bytes.
    assert khqr.merchant_name_alternate == "ចន ស្មីន"
    assert khqr.merchant_city_alternate == "ភ្នំពេញ"
    assert (khqr.created_at_ms, khqr.expires_at_ms) == (1688023959268, None)
    assert khqr.fields["15"] == "1234567812345678ABCDEFGHIJKLMNO"  # UnionPay, kept raw


def test_parse_reads_a_merchant_account() -> None:
    khqr = parse(PUBLISHED_MERCHANT)
    assert khqr.merchant_type == "merchant"
    assert (khqr.account_id, khqr.account_information) == (ACCOUNT, "123456")
    assert khqr.acquiring_bank == "Dev Bank"
    assert (khqr.amount, khqr.currency) == (None, "KHR")
    assert khqr.mobile_number == "85512345678"


def test_parse_reads_expiry_and_ignores_unknown_sub_tags() -> None:
    khqr = parse(PUBLISHED_ABA)
    assert (khqr.created_at_ms, khqr.expires_at_ms) == (1759805345337, 1759805525337)
    assert khqr.bill_number == "MC-REF-KH-15000"
    assert khqr.merchant_name == "OLD ME 25 CHAR WINNER IP2"
    assert khqr.amount == Decimal("100")


def test_parse_keeps_amount_text_as_published() -> None:
    assert parse(PUBLISHED_C297).amount == Decimal("1.0")
    assert parse(PUBLISHED_C297).fields["54"] == "1.0"


def test_parse_ignores_surrounding_whitespace() -> None:
    khqr = parse(f"\n  {PUBLISHED_6894}\t ")
    assert khqr.raw == PUBLISHED_6894
    assert khqr.md5 == md5_of(PUBLISHED_6894)


# Parsing bad strings


def test_tampered_crc_is_rejected() -> None:
    qr = sample()
    wrong = "0000" if qr[-4:] != "0000" else "FFFF"
    with pytest.raises(KhqrError, match="CRC mismatch"):
        parse(qr[:-4] + wrong)


def test_tampered_amount_is_rejected() -> None:
    qr = sample(amount=1000)
    with pytest.raises(KhqrError, match="CRC"):
        parse(qr.replace("54041000", "54049000"))


def test_lowercase_crc_is_rejected() -> None:
    with pytest.raises(KhqrError, match="uppercase"):
        parse(PUBLISHED_198A[:-4] + "198a")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(PUBLISHED_C297[:-8].replace("5910Jonh", "5911Jonh"), id="length-too-long"),
        pytest.param(PUBLISHED_C297[:-8].replace("5910Jonh", "5909Jonh"), id="length-too-short"),
        pytest.param(PUBLISHED_C297[:-8].replace("5910Jonh", "59AAJonh"), id="length-not-digits"),
        pytest.param(
            PUBLISHED_C297[:-8].replace("5910Jonh", "59\u0661\u0660Jonh"), id="non-ascii-digits"
        ),
        pytest.param(PUBLISHED_C297[:-8] + "6050Phnom", id="runs-past-the-end"),
        pytest.param(PUBLISHED_C297[:-8].replace("0014jonh", "0015jonh"), id="inner-length"),
    ],
)
def test_wrong_lengths_are_rejected_even_with_a_good_crc(body: str) -> None:
    with pytest.raises(KhqrError):
        parse(with_crc(body))


@pytest.mark.parametrize(
    ("qr", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("\ud800", "Unicode"),
        (PUBLISHED_C297[:-8], "CRC"),
        (PUBLISHED_C297 + "0201X", "CRC"),
        (with_crc(PUBLISHED_C297[:-8].replace("5910Jonh Smith", "")), "59"),
        (with_crc(PUBLISHED_C297[:-8] + "5910Jonh Smith"), "more than once"),
        (with_crc(PUBLISHED_C297[:-8].replace("5303840", "5303999")), "currency"),
        (with_crc(PUBLISHED_C297[:-8].replace("010212", "010213")), "tag 01"),
        (with_crc(PUBLISHED_C297[:-8].replace("29180014jonhsmith@", "29170013jonhsmith")), "29"),
        (with_crc(PUBLISHED_C297[:-8].replace("54031.0", "54031,0")), "amount"),
        (with_crc(PUBLISHED_C297[6:-8]), "missing: 00"),
        (with_crc("010212000201" + PUBLISHED_C297[12:-8]), "first"),
    ],
)
def test_invalid_strings_say_what_is_wrong(qr: str, message: str) -> None:
    with pytest.raises(KhqrError, match=message):
        parse(qr)


# Building


@pytest.mark.parametrize(
    ("amount", "currency", "written"),
    [
        (Decimal("1.5"), "USD", "1.50"),
        ("1.5", "USD", "1.50"),
        (10, "USD", "10"),
        (Decimal("10.00"), "USD", "10"),
        ("10.25", "USD", "10.25"),
        ("0.01", "USD", "0.01"),
        (Decimal("9999999999.99"), "USD", "9999999999.99"),
        (1000, "KHR", "1000"),
        (Decimal("1000.00"), "KHR", "1000"),
        ("9999999999999", "KHR", "9999999999999"),
    ],
)
def test_amounts_are_written_like_the_official_sdk(
    amount: Decimal | int | str, currency: str, written: str
) -> None:
    khqr = parse(sample(amount=amount, currency=currency))
    assert khqr.fields["54"] == written
    assert khqr.amount == Decimal(written)


@pytest.mark.parametrize(
    ("amount", "currency", "message"),
    [
        (Decimal("1000.5"), "KHR", "whole number"),
        ("0.5", "KHR", "whole number"),
        ("1.005", "USD", "2 decimals"),
        (0, "KHR", "positive"),
        (-5, "USD", "positive"),
        (Decimal("NaN"), "USD", "positive"),
        (10**13, "KHR", "13 characters"),
        ("99999999999.5", "USD", "13 characters"),
        (1.5, "USD", "Decimal"),
        (True, "KHR", "Decimal"),
        ("1e3", "KHR", "Decimal"),
        ("abc", "USD", "Decimal"),
    ],
)
def test_bad_amounts_are_refused(amount: Any, currency: str, message: str) -> None:
    with pytest.raises(KhqrError, match=message):
        sample(amount=amount, currency=currency)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"merchant_name": "x" * 26}, "merchant_name"),
        ({"merchant_name": ""}, "merchant_name"),
        ({"merchant_city": "x" * 16}, "merchant_city"),
        ({"account_id": "jonhsmith"}, "account_id"),
        ({"account_id": "@nbcq"}, "account_id"),
        ({"account_id": "a" * 30 + "@bank"}, "account_id"),
        ({"bill_number": "x" * 26}, "bill_number"),
        ({"mobile_number": "0" * 26}, "mobile_number"),
        ({"store_label": ""}, "store_label"),
        ({"purpose": 42}, "purpose"),
        ({"language_preference": "khm"}, "language_preference"),
        ({"merchant_city_alternate": "x" * 16}, "merchant_city_alternate"),
        ({"currency": "EUR"}, "currency"),
        ({"merchant_type": "company"}, "merchant_type"),
        ({"merchant_type": "merchant", "acquiring_bank": "Dev Bank"}, "account_information"),
        ({"merchant_category_code": "59a9"}, "merchant_category_code"),
        ({"expires_at_ms": None}, "expires_at_ms"),
        ({"expires_at_ms": NOW_MS}, "expires_at_ms"),
        ({"created_at_ms": 1_700_000_000}, "created_at_ms"),
        ({"dynamic": False}, "dynamic QR"),
    ],
)
def test_invalid_build_requests_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(KhqrError, match=field):
        sample(**overrides)


def test_templates_longer_than_99_characters_are_refused() -> None:
    labels = {name: "x" * 25 for name in ("bill_number", "store_label", "terminal_label")}
    with pytest.raises(KhqrError, match="tag 62"):
        sample(**labels, purpose="x" * 25)


def test_a_qr_is_dynamic_exactly_when_it_has_an_amount_by_default() -> None:
    static = parse(build(account_id=ACCOUNT, merchant_name=NAME))
    dynamic = parse(sample())
    assert (static.dynamic, static.amount, static.created_at_ms) == (False, None, None)
    assert "99" not in static.fields and "62" not in static.fields
    assert (dynamic.dynamic, dynamic.created_at_ms) == (True, NOW_MS)
    assert dynamic.expires_at_ms == NOW_MS + DAY_MS


def test_dynamic_must_agree_with_the_amount_as_the_sdk_makes_it() -> None:
    assert parse(sample(dynamic=True)).dynamic
    # Payer apps refuse a dynamic QR without an amount, and an amount without an expiry.
    with pytest.raises(KhqrError, match="amount") as open_amount:
        sample(amount=None, dynamic=True)
    with pytest.raises(KhqrError, match="amount") as fixed_price:
        sample(dynamic=False, created_at_ms=None, expires_at_ms=None)
    assert (open_amount.value.rule, fixed_price.value.rule) == ("amount.required", "amount.static")


def test_creation_time_defaults_to_now() -> None:
    before = int(time.time() * 1000)
    khqr = parse(sample(created_at_ms=None, expires_at_ms=before + DAY_MS))
    after = int(time.time() * 1000)
    assert khqr.created_at_ms is not None
    assert before <= khqr.created_at_ms <= after


def test_lengths_are_written_in_utf16_units_not_bytes() -> None:
    qr = sample(merchant_name="ចន ស្មីន", merchant_name_alternate="ចន ស្មីន", language_preference="km")
    assert "5908ចន ស្មីន" in qr
    assert parse(qr).merchant_name == "ចន ស្មីន"
    # Outside the BMP a character is two UTF-16 units, as the SDK (JavaScript) counts.
    noodle = sample(merchant_name="Noodle \U0001f35c")
    assert "5909Noodle \U0001f35c6010" in noodle
    assert parse(noodle).merchant_name == "Noodle \U0001f35c"
    assert build(account_id=ACCOUNT, merchant_name="\U0001f35c" * 12 + "x")
    with pytest.raises(KhqrError, match="26 UTF-16 units") as too_long:
        build(account_id=ACCOUNT, merchant_name="\U0001f35c" * 13)
    assert too_long.value.rule == "merchant_name.length"


def test_each_dynamic_qr_gets_its_own_md5() -> None:
    first, second = sample(), sample(created_at_ms=NOW_MS + 1)
    assert md5_of(first) != md5_of(second)


# The official SDK's own test expectations (its JS and PHP suites compare everything
# before tag 99, so these pin field order, including tag 62's 01, 02, 03, 07).


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(
            {"account_id": ACCOUNT, "merchant_name": NAME, "merchant_category_code": "0000"},
            "00020101021129180014jonhsmith@nbcq5204000053031165802KH5910Jonh Smith6010Phnom Penh",
            id="individual-static-mcc",
        ),
        pytest.param(
            {
                "account_id": "jonhsmith@devb",
                "merchant_name": NAME,
                "merchant_type": "merchant",
                "account_information": "123456",
                "acquiring_bank": "Dev Bank",
                "currency": "USD",
            },
            "00020101021130400014jonhsmith@devb01061234560208Dev Bank5204599953038405802KH"
            "5910Jonh Smith6010Phnom Penh",
            id="merchant-static",
        ),
        pytest.param(
            {
                "account_id": "jonhsmith@devb",
                "merchant_name": NAME,
                "merchant_city": "Siam Reap",
                "merchant_type": "merchant",
                "account_information": "123456",
                "acquiring_bank": "Dev Bank",
                "amount": 50000,
                "mobile_number": "85512345678",
                "bill_number": "INV-2021-07-65822",
                "store_label": "BKK-1",
                "terminal_label": "012345",
            },
            "00020101021230400014jonhsmith@devb01061234560208Dev Bank520459995303116540550000"
            "5802KH5910Jonh Smith6009Siam Reap62550117INV-2021-07-6582202118551234567803"
            "05BKK-10706012345",
            id="merchant-khr-all-labels",
        ),
        pytest.param(
            {
                "account_id": "jonhsmith@devb",
                "merchant_name": NAME,
                "merchant_type": "merchant",
                "account_information": "123456",
                "acquiring_bank": "Dev Bank",
                "amount": 10,
                "currency": "USD",
                "mobile_number": "85512345678",
                "bill_number": "INV-2021-07-65822",
            },
            "00020101021230400014jonhsmith@devb01061234560208Dev Bank5204599953038405402105802KH"
            "5910Jonh Smith6010Phnom Penh62360117INV-2021-07-65822021185512345678",
            id="merchant-usd",
        ),
    ],
)
def test_build_matches_the_official_sdk_test_suite(kwargs: dict[str, Any], expected: str) -> None:
    stamps = ""
    if "amount" in kwargs:
        kwargs |= {"created_at_ms": NOW_MS, "expires_at_ms": NOW_MS + DAY_MS}
        stamps = f"99340013{NOW_MS}0113{NOW_MS + DAY_MS}"
    assert build(**kwargs) == with_crc(expected + stamps)


# Cross-check against the bakong-khqr package


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """bakong-khqr stamps tag 99 from time.time(); pin it to NOW_MS."""
    clock = SimpleNamespace(time=lambda: NOW_MS / 1000)
    monkeypatch.setattr(bakong_khqr.sdk.timestamp, "time", clock)


def theirs(amount: Decimal | int, currency: str, days: int = 1, **extra: Any) -> Any:
    return KHQR().create_qr(
        account_id=ACCOUNT,
        merchant_name=NAME,
        merchant_city=CITY,
        amount=float(amount),
        currency=currency,
        expiration=days,
        **extra,
    )


# Only cases the package writes like the official SDK: it writes USD 1.5 as "1.5", puts
# tag 62's sub-tags in the order 03, 02, 01, 07 and rewrites 855... phone numbers.
@pytest.mark.parametrize(
    ("amount", "currency", "days", "extra"),
    [
        pytest.param(1000, "KHR", 1, {}, id="khr"),
        pytest.param(Decimal("250000"), "KHR", 7, {"bill_number": "INV-2024-0001"}, id="khr-bill"),
        pytest.param(Decimal("10"), "USD", 1, {}, id="usd-whole"),
        pytest.param(Decimal("10.25"), "USD", 1, {"store_label": "Coffee Klaing"}, id="usd-store"),
        pytest.param(Decimal("0.01"), "USD", 2, {"terminal_label": "POS-7"}, id="usd-cent"),
        pytest.param(Decimal("99.99"), "USD", 1, {"phone_number": "012345678"}, id="usd-phone"),
    ],
)
@pytest.mark.usefixtures("frozen_clock")
def test_dynamic_qrs_match_bakong_khqr_exactly(
    amount: Decimal | int, currency: str, days: int, extra: dict[str, str]
) -> None:
    reference = theirs(amount, currency, days, **extra)
    ours = build(
        account_id=ACCOUNT,
        merchant_name=NAME,
        merchant_city=CITY,
        amount=amount,
        currency=currency,
        created_at_ms=NOW_MS,
        expires_at_ms=NOW_MS + days * DAY_MS,
        bill_number=extra.get("bill_number"),
        mobile_number=extra.get("phone_number"),
        store_label=extra.get("store_label"),
        terminal_label=extra.get("terminal_label"),
    )
    assert ours == reference.qr
    assert md5_of(ours) == reference.md5


@pytest.mark.usefixtures("frozen_clock")
def test_static_qrs_differ_from_bakong_khqr_only_by_its_creation_stamp() -> None:
    # The sheet says static QRs carry no tag 99; bakong-khqr still writes 99.00.
    reference = theirs(0, "USD", static=True).qr
    ours = build(account_id=ACCOUNT, merchant_name=NAME, merchant_city=CITY, currency="USD")
    assert reference[:-8] == ours[:-8] + f"99170013{NOW_MS}"
    assert parse(reference).created_at_ms == NOW_MS
    assert parse(reference).expires_at_ms is None


@pytest.mark.usefixtures("frozen_clock")
def test_parse_reads_bakong_khqr_output() -> None:
    reference = theirs(
        Decimal("1.5"),
        "USD",
        bill_number="INV-9",
        phone_number="012345678",
        store_label="Shop",
        terminal_label="T1",
    )
    khqr = parse(reference.qr)
    assert khqr.md5 == reference.md5
    assert (khqr.account_id, khqr.merchant_name, khqr.merchant_city) == (ACCOUNT, NAME, CITY)
    assert (khqr.dynamic, khqr.currency, khqr.amount) == (True, "USD", Decimal("1.5"))
    assert (khqr.created_at_ms, khqr.expires_at_ms) == (NOW_MS, NOW_MS + DAY_MS)
    assert (khqr.bill_number, khqr.mobile_number) == ("INV-9", "012345678")
    assert (khqr.store_label, khqr.terminal_label) == ("Shop", "T1")


# Properties


def tlv(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{tag}{len(value):02d}{value}" for tag, value in pairs)


SHORT_TEXT = st.text(max_size=12)
# sampled_from leans towards its first items, so this spoils a value now and then.
SPOIL = st.sampled_from([False] * 9 + [True])


def template(*sub_tags: str, values: st.SearchStrategy[str] = SHORT_TEXT) -> Any:
    return st.lists(st.tuples(st.sampled_from(sub_tags), values), max_size=4).map(tlv)


# Plausible values per tag, in KHQR order; near_khqr() spoils them now and then.
FIELDS: list[tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = [
    (st.just("00"), st.just("01")),
    (st.just("01"), st.sampled_from(["11", "12"])),
    (st.just("15"), st.text(max_size=8)),
    (st.sampled_from(["29", "30"]), template("01", "02").map(lambda rest: "0003a@b" + rest)),
    (st.just("52"), st.just("5999")),
    (st.just("53"), st.sampled_from(["116", "840"])),
    (st.just("54"), st.from_regex(r"[0-9]{1,4}(\.[0-9]{0,2})?", fullmatch=True)),
    (st.just("58"), st.just("KH")),
    (st.just("59"), st.text(max_size=25)),
    (st.just("60"), st.text(max_size=15)),
    (st.just("62"), template("01", "02", "03", "07", "08", "50")),
    (st.just("64"), template("00", "01", "02")),
    (st.just("99"), template("00", "01", values=st.from_regex(r"[0-9]{13}", fullmatch=True))),
]


@st.composite
def near_khqr(draw: st.DrawFn) -> str:
    """KHQR-shaped strings with omitted fields, junk values and wrong lengths, but a good CRC."""
    parts = []
    for tags, values in FIELDS:
        if draw(SPOIL):
            continue
        value = draw(SHORT_TEXT if draw(SPOIL) else values)
        length = draw(st.integers(0, 99)) if draw(SPOIL) else len(value)
        parts.append(f"{draw(tags)}{length:02d}{value}")
    return with_crc("".join(parts))


@given(st.text(st.characters(exclude_categories=())) | near_khqr())
def test_parse_and_verify_raise_only_khqr_error(qr: str) -> None:
    for read in (parse, verify):
        try:
            result = read(qr)
        except KhqrError as exc:
            assert exc.rule
            continue
        assert isinstance(result, Khqr)


SIGNED = sample(bill_number="INV-1", store_label="Shop", merchant_name="Sok Dara")


@given(
    st.integers(0, len(SIGNED) - 1),
    st.characters(min_codepoint=0x21, max_codepoint=0x7E),
)
def test_any_single_character_change_is_caught(position: int, char: str) -> None:
    tampered = SIGNED[:position] + char + SIGNED[position + 1 :]
    if tampered != SIGNED:
        with pytest.raises(KhqrError):
            parse(tampered)


def fit(text: str, units: int) -> str:
    """`text` cut to at most `units` UTF-16 units."""
    while utf16_length(text) > units:
        text = text[:-1]
    return text


def texts(max_size: int, exclude: str = "") -> st.SearchStrategy[str]:
    alphabet = st.characters(exclude_categories=["Cs"], exclude_characters=exclude)
    # At most max_size UTF-16 units: characters outside the BMP count two.
    return st.text(alphabet, min_size=1, max_size=max_size).map(lambda s: fit(s, max_size) or "x")


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


@st.composite
def build_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Valid build() arguments, sized so every template fits in 99 characters."""
    currency = draw(st.sampled_from(["KHR", "USD"]))
    whole = st.integers(1, 10**13 - 1)
    cents = st.integers(1, 10**12 - 1).map(lambda n: Decimal(n) / 100)
    amount = draw(optional(whole if currency == "KHR" else whole | cents))
    merchant_type = draw(st.sampled_from(["individual", "merchant"]))
    created = draw(st.integers(10**12, 10**13 - 2))
    # The SDK writes the language preference only with the alternate name, and the reverse.
    language = draw(optional(st.tuples(texts(2).filter(lambda s: utf16_length(s) == 2), texts(25))))
    request: dict[str, Any] = {
        "account_id": draw(texts(15, "@")) + "@" + draw(texts(16)),
        "merchant_name": draw(texts(25)),
        "merchant_city": draw(texts(15)),
        "amount": amount,
        "currency": currency,
        "merchant_type": merchant_type,
        "merchant_category_code": draw(st.from_regex(r"[0-9]{4}", fullmatch=True)),
        "language_preference": language and language[0],
        "merchant_name_alternate": language and language[1],
        "merchant_city_alternate": draw(optional(texts(15))),
    }
    for name in ("bill_number", "mobile_number", "store_label", "terminal_label", "purpose"):
        request[name] = draw(optional(texts(15)))
    required = merchant_type == "merchant"
    for name in ("account_information", "acquiring_bank"):
        request[name] = draw(texts(25)) if required else draw(optional(texts(25)))
    if amount is not None:
        request["created_at_ms"] = created
        request["expires_at_ms"] = draw(st.integers(created + 1, 10**13 - 1))
    return request


@given(build_requests())
def test_build_then_parse_round_trips(kwargs: dict[str, Any]) -> None:
    qr = build(**kwargs)
    khqr = parse(qr)
    assert (khqr.raw, khqr.md5) == (qr, md5_of(qr))
    assert khqr.dynamic == (kwargs["amount"] is not None)
    assert khqr.amount == (None if kwargs["amount"] is None else Decimal(kwargs["amount"]))
    assert khqr.created_at_ms == kwargs.get("created_at_ms")
    assert khqr.expires_at_ms == kwargs.get("expires_at_ms")
    assert khqr.country_code == "KH"
    skip = {"amount", "created_at_ms", "expires_at_ms"}
    for name, value in kwargs.items():
        if name not in skip:
            assert getattr(khqr, name) == value, name


# The official SDK itself (npm bakong-khqr 1.0.20, tests/khqr_oracle) as the oracle


@pytest.fixture(scope="module")
def sdk() -> Sdk:
    return khqr_sdk.shared()


# Text as merchants type it: ASCII, Khmer, emoji and other characters outside the BMP
# (two UTF-16 units each, as the SDK counts them), and anything else but lone surrogates.
CHARS = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(min_codepoint=0x1780, max_codepoint=0x17FF),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.characters(min_codepoint=0x10000, exclude_categories=["Cs"]),
    st.characters(exclude_categories=["Cs"]),
)


@st.composite
def text_near(draw: st.DrawFn, limit: int, *, over: bool = True, empty: bool = False) -> str:
    """Text of a drawn UTF-16 length, often right at `limit` or (with `over`) one past it."""
    top = limit + 2 if over else limit
    edges = [limit, limit + 1] if over else [limit]
    target = draw(st.sampled_from(edges) | st.integers(0 if empty else 1, top))
    text = ""
    while utf16_length(text) < target:
        char = draw(CHARS)
        text += char if utf16_length(text + char) <= target else "x"
    return text


def sometimes(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """None three times in four, so a template of five optional fields mostly fits in 99."""
    return st.sampled_from([None, None, None]) | strategy


def amounts(currency: str) -> st.SearchStrategy[Decimal]:
    whole = st.integers(1, 10**13).map(Decimal)  # 10**13 is one character too many
    cents = st.integers(1, 10**13).map(lambda n: Decimal(n) / 100)
    mills = st.integers(1, 10**6).map(lambda n: Decimal(n) / 1000)  # refused by both
    return whole | cents | mills if currency == "USD" else whole | cents


@st.composite
def sdk_cases(draw: st.DrawFn) -> tuple[int, dict[str, Any]]:
    """A moment and build() arguments, valid or just past a limit, for the SDK and for us."""
    now = draw(st.integers(10**12, 10**13 - 10**10))
    currency = draw(st.sampled_from(["KHR", "USD"]))
    merchant = draw(st.booleans())
    kwargs: dict[str, Any] = {
        "account_id": draw(text_near(15)) + "@" + draw(text_near(16)),
        "merchant_name": draw(text_near(25, empty=True)),
        "merchant_city": draw(text_near(15)),
        "currency": currency,
        "amount": draw(st.none() | amounts(currency)),
        "merchant_type": "merchant" if merchant else "individual",
        "merchant_category_code": draw(st.from_regex(r"[0-9]{4}", fullmatch=True)),
        "account_information": draw(
            (st.none() | text_near(32)) if merchant else sometimes(text_near(32))
        ),
        "acquiring_bank": draw(
            (st.none() | text_near(32)) if merchant else sometimes(text_near(32))
        ),
        "language_preference": draw(sometimes(text_near(2))),
        "merchant_name_alternate": draw(sometimes(text_near(25))),
        "merchant_city_alternate": draw(sometimes(text_near(15))),
    }
    for name in ("bill_number", "mobile_number", "store_label", "terminal_label", "purpose"):
        kwargs[name] = draw(sometimes(text_near(25)))
    if kwargs["amount"] is not None:
        life = st.integers(1, 10**9) | st.integers(-(10**7), -1) | st.just(10**13)
        kwargs["created_at_ms"] = now
        kwargs["expires_at_ms"] = now + draw(life)
    return now, kwargs


def ours_or_none(kwargs: dict[str, Any]) -> str | None:
    try:
        return build(**kwargs)
    except KhqrError:
        return None


@settings(max_examples=250)
@given(case=sdk_cases())
@example(
    case=(NOW_MS, {"account_id": "noodle@aclb", "merchant_name": "Noodle \U0001f35c", "amount": 1})
)
def test_build_makes_exactly_what_the_sdk_generates(sdk: Sdk, case: Any) -> None:
    now, kwargs = case
    if kwargs.get("amount") is not None:
        kwargs = {"created_at_ms": now, "expires_at_ms": now + DAY_MS} | kwargs
    theirs = sdk.generate(now, **kwargs)
    if theirs is not None and not sdk.verify(theirs, now).valid:
        theirs = None  # made, but unreadable even by the SDK: a template over 99 units
    ours = ours_or_none(kwargs)
    assert ours == theirs
    if ours is not None:
        khqr = verify(ours, now_ms=now)
        assert (khqr.merchant_name, khqr.account_id) == (
            kwargs["merchant_name"],
            kwargs["account_id"],
        )
        assert khqr.expires_at_ms == kwargs.get("expires_at_ms")


# Where verify is stricter than the SDK's verify, on purpose: the NBC sheet's rules that the
# SDK does not check (country, amount, MCC, creation time), and empty fields and expiries of
# no length, which no payer can use. Everything else the SDK refuses, we refuse too.
STRICTER_THAN_SDK = {
    "country_code.value",
    "amount.zero",
    "amount.format",
    "merchant_category_code.format",
    "created_at.required",
    "created_at.format",
    "expires_at.format",  # leading zeros: the SDK reads the digits as a number
    "expires_at.order",  # an expiry equal to the creation
    "expires_at.past",  # an expiry equal to now
    "account_id.format",  # "name@" with no bank
    "account_information.empty",
    "language_preference.empty",
    "additional_data.empty",
    "language_template.empty",
}


def tlv16(tag: str, value: str) -> str:
    return f"{tag}{utf16_length(value):02d}{value}"


def flat(fields: dict[str, Any]) -> dict[str, str]:
    """Each template (a dict of sub-tags) written out; None leaves a field out."""
    written = {}
    for tag, value in fields.items():
        if isinstance(value, dict):
            value = "".join(tlv16(sub, text) for sub, text in value.items() if text is not None)
        if value is not None:
            written[tag] = value
    return written


def encode(fields: dict[str, Any]) -> str:
    """A KHQR string of `fields`, with a good CRC."""
    return with_crc("".join(tlv16(tag, value) for tag, value in flat(fields).items()))


def stamp(now: int) -> st.SearchStrategy[str | None]:
    near = st.integers(-(10**7), 10**7).map(lambda delta: str(now + delta))
    return st.none() | near | st.from_regex(r"[0-9]{11,15}", fullmatch=True) | st.just("")


@st.composite
def spoiled_qrs(draw: st.DrawFn) -> tuple[int, str]:
    """A valid dynamic KHQR string with one to three fields spoiled, and a moment to read it."""
    now = draw(st.integers(10**12 + 10**8, 10**13 - 10**8))
    valid = {
        "00": "01",
        "01": "12",
        "29": {"00": "shop@aclb", "01": "012345678", "02": "Dev Bank"},
        "52": "5999",
        "53": draw(st.sampled_from(["116", "840"])),
        "54": "1000",
        "58": "KH",
        "59": draw(text_near(25, over=False)),
        "60": draw(text_near(15, over=False)),
        "62": {"01": draw(text_near(25, over=False)), "03": "Shop"},
        "64": {"00": "km", "01": draw(text_near(25, over=False))},
        "99": {"00": str(now - 1000), "01": str(now + 600_000)},
    }
    spoils: dict[tuple[str, str | None], st.SearchStrategy[Any]] = {
        ("01", None): st.sampled_from(["11", "12", "13", "1"]),
        ("52", None): st.from_regex(r"[0-9]{0,5}", fullmatch=True) | st.just("59a9"),
        ("53", None): st.sampled_from(["116", "840", "978", "0116", "11"]),
        ("54", None): st.none()
        | st.sampled_from(["0", "0.00", "00", ".5", "1.", "-1", "1e5", "abc", "1,5"])
        | st.from_regex(r"[0-9]{1,15}(\.[0-9]{1,3})?", fullmatch=True),
        ("58", None): st.sampled_from(["KH", "US", "KHM", "KHMR", "", "kh"]),
        ("59", None): text_near(25, empty=True),
        ("60", None): text_near(15, empty=True),
        ("62", None): st.just(""),
        ("64", None): st.just(""),
        ("99", None): st.none(),
        ("29", "00"): st.tuples(text_near(15), st.sampled_from(["", "@", "@aclb"])).map("".join)
        | text_near(32),
        ("29", "01"): st.none() | text_near(32, empty=True),
        ("29", "02"): st.none() | text_near(32, empty=True),
        ("62", "01"): st.none() | text_near(25, empty=True),
        ("62", "02"): st.none() | text_near(25, empty=True),
        ("62", "07"): st.none() | text_near(25, empty=True),
        ("62", "08"): st.none() | text_near(25, empty=True),
        ("64", "00"): st.none() | text_near(2, empty=True),
        ("64", "01"): st.none() | text_near(25, empty=True),
        ("64", "02"): st.none() | text_near(15, empty=True),
        ("99", "00"): stamp(now),
        ("99", "01"): stamp(now),
    }
    for tag, sub in draw(st.lists(st.sampled_from(list(spoils)), min_size=1, max_size=3)):
        value = draw(spoils[tag, sub])
        if sub is None:
            valid[tag] = value
        elif isinstance(valid[tag], dict):
            valid[tag] = {**valid[tag], sub: value}
    assume(all(utf16_length(value) <= 99 for value in flat(valid).values()))
    return now, encode(valid)


@settings(max_examples=300)
@given(case=spoiled_qrs())
def test_verify_refuses_whatever_the_sdk_refuses(sdk: Sdk, case: tuple[int, str]) -> None:
    now, qr = case
    theirs = sdk.verify(qr, now)
    try:
        verify(qr, now_ms=now)
    except KhqrError as exc:
        event(f"SDK {'accepts' if theirs.valid else 'refuses'}, we refuse: {exc.rule}")
        if theirs.valid:
            # A refusal the SDK does not share must be one of the rules it lacks.
            assert exc.rule in STRICTER_THAN_SDK, (exc.rule, str(exc))
            # The two time rules differ from the SDK's only at equality.
            if exc.rule == "expires_at.past":
                assert parse(qr).expires_at_ms == now
            if exc.rule == "expires_at.order":
                assert parse(qr).expires_at_ms == parse(qr).created_at_ms
    else:
        event("both accept")
        assert theirs.valid, theirs.reason
        read, decoded = parse(qr), sdk.decode(qr)
        assert (decoded["merchantName"], decoded["merchantCity"]) == (
            read.merchant_name,
            read.merchant_city,
        )
        assert decoded["billNumber"] == read.bill_number
        assert decoded["transactionAmount"] == read.fields.get("54")
        expires = read.expires_at_ms
        assert decoded["expirationTimestamp"] == (None if expires is None else str(expires))


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"58": "US"}, "country_code.value"),
        ({"54": "0"}, "amount.zero"),
        ({"54": "abc"}, "amount.format"),
        ({"52": "599"}, "merchant_category_code.format"),
        ({"99": {"01": str(NOW_MS + DAY_MS)}}, "created_at.required"),
        ({"99": {"00": str(NOW_MS), "01": str(NOW_MS)}}, "expires_at.order"),
        ({"99": {"00": str(NOW_MS - 1), "01": str(NOW_MS)}}, "expires_at.past"),
        ({"99": {"00": str(NOW_MS), "01": f"00{NOW_MS + DAY_MS}"}}, "expires_at.format"),
        ({"29": {"00": "shop@"}}, "account_id.format"),
        ({"29": {"00": "shop@aclb", "01": ""}}, "account_information.empty"),
        ({"62": ""}, "additional_data.empty"),
    ],
)
def test_where_verify_is_stricter_than_the_sdk_on_purpose(
    sdk: Sdk, changes: dict[str, Any], rule: str
) -> None:
    fields: dict[str, Any] = {
        "00": "01",
        "01": "12",
        "29": {"00": "shop@aclb"},
        "52": "5999",
        "53": "840",
        "54": "1.50",
        "58": "KH",
        "59": "Coffee Shop",
        "60": "Siem Reap",
        "99": {"00": str(NOW_MS - 1000), "01": str(NOW_MS + DAY_MS)},
    }
    qr = encode(fields | changes)
    assert sdk.verify(qr, NOW_MS).valid
    with pytest.raises(KhqrError) as refused:
        verify(qr, now_ms=NOW_MS)
    assert refused.value.rule == rule


def test_verify_reads_the_expiry_and_accepts_what_the_sdk_makes(sdk: Sdk) -> None:
    expires = NOW_MS + 600_000
    theirs = sdk.generate(
        NOW_MS,
        account_id="noodle@aclb",
        merchant_name="Noodle \U0001f35c",
        merchant_city="ភ្នំពេញ",
        amount=Decimal("2.5"),
        currency="USD",
        expires_at_ms=expires,
    )
    assert theirs is not None
    khqr = verify(theirs, now_ms=NOW_MS)
    assert (khqr.created_at_ms, khqr.expires_at_ms) == (NOW_MS, expires)
    assert (khqr.merchant_name, khqr.merchant_city) == ("Noodle \U0001f35c", "ភ្នំពេញ")
    with pytest.raises(KhqrError) as late:
        verify(theirs, now_ms=expires)
    assert late.value.rule == "expires_at.past"
    assert not sdk.verify(theirs, expires + 1).valid
