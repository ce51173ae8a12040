"""The official bakong-khqr npm SDK (tests/khqr_oracle) as an oracle: one node process."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

ORACLE = Path(__file__).parent / "khqr_oracle"
SCRIPT = ORACLE / "oracle.js"
INSTALLED = ORACLE / "node_modules" / "bakong-khqr" / "package.json"
CURRENCY_CODES = {"KHR": 116, "USD": 840}
# build() argument -> the SDK's optional field of the same meaning.
OPTIONAL = {
    "account_information": "accountInformation",
    "bill_number": "billNumber",
    "mobile_number": "mobileNumber",
    "store_label": "storeLabel",
    "terminal_label": "terminalLabel",
    "purpose": "purposeOfTransaction",
    "language_preference": "languagePreference",
    "merchant_name_alternate": "merchantNameAlternateLanguage",
    "merchant_city_alternate": "merchantCityAlternateLanguage",
    "merchant_category_code": "merchantCategoryCode",
}


@dataclass(frozen=True)
class Verdict:
    valid: bool
    reason: str | None


class Sdk:
    """Requests to the SDK, answered in order by the node process behind `process`."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._process = process

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the KHQR oracle exited ({self._process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def generate(self, now_ms: int, **kwargs: Any) -> str | None:
        """What the SDK makes from build()'s arguments at `now_ms`; None when it refuses."""
        answer = self._ask({"op": "generate", "now": now_ms, **sdk_request(kwargs)})
        return answer.get("qr")

    def verify(self, qr: str, now_ms: int) -> Verdict:
        answer = self._ask({"op": "verify", "now": now_ms, "qr": qr})
        return Verdict(answer["valid"], answer["reason"])

    def decode(self, qr: str) -> dict[str, Any]:
        data: dict[str, Any] = self._ask({"op": "decode", "qr": qr})["data"]
        return data


def sdk_request(kwargs: dict[str, Any]) -> dict[str, Any]:
    """build()'s keyword arguments as the SDK's IndividualInfo / MerchantInfo fields."""
    optional: dict[str, Any] = {
        sdk: kwargs[ours] for ours, sdk in OPTIONAL.items() if kwargs.get(ours) is not None
    }
    optional["currency"] = CURRENCY_CODES[kwargs.get("currency", "KHR")]
    if kwargs.get("amount") is not None:
        # A JSON number, as a JavaScript caller passes it; exact for up to 15 digits.
        optional["amount"] = float(Decimal(kwargs["amount"]))
    if kwargs.get("expires_at_ms") is not None:
        optional["expirationTimestamp"] = kwargs["expires_at_ms"]
    merchant = kwargs.get("merchant_type") == "merchant"
    info: dict[str, Any] = {
        "bakongAccountID": kwargs["account_id"],
        "merchantName": kwargs["merchant_name"],
        "merchantCity": kwargs.get("merchant_city", "Phnom Penh"),
        "optional": optional,
    }
    if merchant:
        info["merchantID"] = kwargs.get("account_information")
        info["acquiringBank"] = kwargs.get("acquiring_bank")
        optional.pop("accountInformation", None)
    elif kwargs.get("acquiring_bank") is not None:
        optional["acquiringBank"] = kwargs["acquiring_bank"]
    return {"merchant": merchant, "info": info}


def missing() -> str | None:
    """Why the oracle cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (Debian: apt-get install -y nodejs npm)"
    if not INSTALLED.exists():
        return "the KHQR oracle is not installed: npm ci --prefix tests/khqr_oracle"
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


_shared: list[Sdk] = []


def shared() -> Sdk:
    """The session's oracle, started on first use; skips without node, fails under CI."""
    if _shared:
        return _shared[0]
    reason = missing()
    if reason is not None:
        if _in_ci():
            pytest.fail(f"CI needs the KHQR SDK oracle: {reason}")
        pytest.skip(reason)
    process = subprocess.Popen(
        ["node", str(SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        cwd=ORACLE,
    )
    # The node process ends when its stdin closes, at the latest when pytest exits.
    atexit.register(_stop, process)
    _shared.append(Sdk(process))
    return _shared[0]


def _stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
