"""The merchant's ledger: CSV/JSONL exports streamed in constant memory, daily totals."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import orjson

from khqr_gateway.apps.model import DEFAULT_APP_ID
from tests.conftest import Gateway, GatewayFactory, random_md5, secret

PP = ZoneInfo("Asia/Phnom_Penh")
HEADER = (
    "jobId,md5,status,late,amount,currency,toAccountId,fromAccountId,hash,externalRef,"
    "billNumber,createdAt,paidAt,completedAt,metadata"
)
# A KHQR with bill number INV-77 (tag 62.01), as khqr.build makes it.
QR_WITH_BILL = (
    "00020101021229130009shop@aclb52045999530384054041.505802KH5904Shop6010Phnom Penh"
    "62160106INV-770302S1993400131796166855276011317961674552756304A58F"
)


async def insert(
    pg: asyncpg.Connection,
    *,
    status: str = "success",
    created_at: datetime | None = None,
    completed_at: datetime | None = None,
    data: dict[str, Any] | None = None,
    expected: dict[str, Any] | None = None,
    metadata: Any = None,
    late: bool = False,
    superseded: bool = False,
    qr: str | None = None,
) -> str:
    job_id = uuid.uuid4()
    now = datetime.now(UTC)
    await pg.execute(
        """
        insert into transactions (id, md5, status, webhook_url, deadline_at, created_at,
            completed_at, bakong_data, expected, metadata, late, superseded, qr)
        values ($1, $2, $3, 'http://x/hook', $4, $4, $5, $6::json, $7::jsonb, $8::json, $9,
                $10, $11)
        """,
        job_id,
        random_md5(),
        status,
        created_at or now,
        completed_at if completed_at is not None or status == "pending" else now,
        orjson.dumps(data).decode() if data is not None else None,
        orjson.dumps(expected).decode() if expected is not None else None,
        orjson.dumps(metadata).decode() if metadata is not None else None,
        late,
        superseded,
        qr,
    )
    return str(job_id)


def paid(amount: Any, currency: str = "USD", to: str = "shop@aclb", **more: Any) -> dict[str, Any]:
    return {
        "amount": amount,
        "currency": currency,
        "toAccountId": to,
        "fromAccountId": "customer@aclb",
        "hash": "ab" * 32,
        "externalRef": "100FT1",
        "acknowledgedDateMs": 1764547200000,
        **more,
    }


async def export(gw: Gateway, query: str) -> tuple[int, dict[str, str], bytes]:
    resp = await gw.client.get(f"/api/v1/transactions/export?{query}", headers=gw.headers)
    return resp.status, dict(resp.headers), await resp.read()


def read_csv(body: bytes) -> list[dict[str, str]]:
    assert body.startswith("\ufeff".encode()), "a BOM: spreadsheets then read UTF-8"
    return list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"))))


async def test_csv_export_has_every_row_and_column_with_khmer_intact(
    gateway: Gateway, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        """
        insert into transactions (id, md5, status, webhook_url, deadline_at, created_at,
            completed_at, bakong_data, metadata)
        select gen_random_uuid(), md5(n::text), 'success', 'http://x/hook', now(),
               now() - n * interval '1 second', now(),
               json_build_object('amount', n, 'currency', 'KHR', 'toAccountId', 'shop@aclb'),
               json_build_object('orderId', 'ក-' || n)
        from generate_series(1, 3000) n
        """
    )
    superseded = await insert(pg, superseded=True, data=paid(1))
    billed = await insert(pg, status="pending", qr=QR_WITH_BILL, expected={"amount": "1.5"})

    status, headers, body = await export(gateway, "format=csv")
    assert status == 200, body[:300]
    assert headers["Content-Type"].startswith("text/csv")
    assert "attachment" in headers["Content-Disposition"]
    assert body.decode("utf-8-sig").splitlines()[0] == HEADER
    rows = read_csv(body)
    assert len(rows) == 3001, "every row but the superseded one"
    assert superseded not in {r["jobId"] for r in rows}
    assert [r["createdAt"] for r in rows] == sorted(r["createdAt"] for r in rows)
    by_order = {orjson.loads(r["metadata"]).get("orderId"): r for r in rows if r["metadata"]}
    row = by_order["ក-42"]
    assert row["amount"] == "42" and row["currency"] == "KHR" and row["status"] == "success"
    assert row["createdAt"].endswith("Z") and datetime.fromisoformat(row["createdAt"])
    [bill] = [r for r in rows if r["jobId"] == billed]
    assert bill["billNumber"] == "INV-77" and bill["amount"] == "1.5" and bill["paidAt"] == ""


async def test_export_filters_by_time_and_status(gateway: Gateway, pg: asyncpg.Connection) -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    inside = await insert(pg, created_at=start + timedelta(hours=1), data=paid(2))
    await insert(pg, created_at=start + timedelta(hours=2), status="timeout")
    await insert(pg, created_at=start - timedelta(seconds=1), data=paid(3))
    await insert(pg, created_at=start + timedelta(days=1), data=paid(4))
    query = "from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z&status=success"
    status, _, body = await export(gateway, query)
    assert status == 200
    assert [r["jobId"] for r in read_csv(body)] == [inside]


async def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(
    gateway: Gateway, pg: asyncpg.Connection
) -> None:
    evil = paid(
        5,
        fromAccountId='=HYPERLINK("http://evil","x")',
        hash="+1+2",
        externalRef="@SUM(A1)",
        toAccountId="-2+3",
    )
    await insert(pg, data=evil, metadata={"note": "=cmd"})
    _, _, body = await export(gateway, "")
    [row] = read_csv(body)
    assert row["fromAccountId"] == '\'=HYPERLINK("http://evil","x")'
    assert row["hash"] == "'+1+2"
    assert row["externalRef"] == "'@SUM(A1)"
    assert row["toAccountId"] == "'-2+3"
    assert row["amount"] == "5", "numbers are not text"
    assert orjson.loads(row["metadata"]) == {"note": "=cmd"}, "JSON starts with {, not ="


async def test_jsonl_export_has_numbers_and_the_metadata_stored(
    gateway: Gateway, pg: asyncpg.Connection
) -> None:
    job = await insert(pg, data=paid(12.5), metadata={"orderId": "A-1", "n": [1, 2]}, late=True)
    status, headers, body = await export(gateway, "format=jsonl")
    assert status == 200
    assert headers["Content-Type"].startswith("application/x-ndjson")
    [line] = [orjson.loads(x) for x in body.splitlines()]
    assert line["jobId"] == job and line["amount"] == 12.5 and line["late"] is True
    assert line["metadata"] == {"orderId": "A-1", "n": [1, 2]}
    assert line["paidAt"] == "2025-12-01T00:00:00.000Z"
    assert list(line) == HEADER.split(",")


async def test_export_refuses_bad_queries_with_the_error_shape(gateway: Gateway) -> None:
    for query, field in (
        ("format=xlsx", "format"),
        ("from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z", "to"),
        ("from=yesterday", "from"),
        ("status=paid", "status"),
        ("colour=red", "colour"),
    ):
        status, body = await gateway.get(f"/api/v1/transactions/export?{query}")
        assert status == 422, (query, body)
        assert body["error"]["code"] == "validation_error"
        assert field in {d["field"] for d in body["error"]["details"]}, (query, body)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_export_streams_in_constant_memory(gateway: Gateway, pg: asyncpg.Connection) -> None:
    """40,000 rows of about 2 KB (about 85 MB of CSV) stream through with RSS sampled at every
    chunk. Fat rows rather than many: what must not be held is the body, and each row
    inserted costs its indexes (the search terms' GIN among them) about 0.1 ms."""
    await pg.execute(
        """
        insert into transactions (id, md5, status, webhook_url, deadline_at, completed_at,
            bakong_data, metadata)
        select gen_random_uuid(), md5(n::text), 'success', 'http://x/hook', now(), now(),
               json_build_object('amount', n, 'currency', 'USD', 'toAccountId', 'shop@aclb',
                                 'fromAccountId', 'customer@aclb', 'hash', md5(n::text),
                                 'externalRef', 'FT' || n),
               json_build_object('orderId', 'order-' || n, 'note', repeat('x', 1900))
        from generate_series(1, 40000) n
        """
    )
    base = _rss_bytes()
    resp = await gateway.client.get("/api/v1/transactions/export", headers=gateway.headers)
    assert resp.status == 200
    peak, size, lines = base, 0, 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        lines += chunk.count(b"\n")
        peak = max(peak, _rss_bytes())
    assert lines == 40_001
    assert size > 60_000_000
    assert peak - base < 50 * 2**20, f"grew {(peak - base) / 2**20:.1f} MB"


def _pp_midnight(day: datetime) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=PP)


async def test_daily_report_sums_match_sums_made_here(
    gateway: Gateway, pg: asyncpg.Connection
) -> None:
    rng = random.Random(7)
    first = _pp_midnight(datetime(2026, 11, 10))
    want: dict[tuple[str, str | None, str | None], dict[str, Any]] = defaultdict(
        lambda: defaultdict(int)
    )
    for _ in range(400):
        # Times within two hours of a Phnom Penh midnight land on both sides of it.
        day = rng.randrange(4)
        at = first + timedelta(days=day, minutes=rng.choice([5, 60, 1380, 1435]))
        status = rng.choice(["success", "success", "mismatch", "failed", "timeout", "pending"])
        currency, to = rng.choice([("USD", "shop@aclb"), ("KHR", "shop@aclb"), ("USD", "b@wing")])
        amount = Decimal(rng.randrange(1, 100000)) / (100 if currency == "USD" else 1)
        late = status == "success" and rng.random() < 0.2
        superseded = rng.random() < 0.05
        data = paid(float(amount), currency, to) if status in ("success", "mismatch") else None
        expected = {"currency": currency, "toAccountId": to} if status == "timeout" else None
        await insert(
            pg,
            status=status,
            completed_at=at,
            data=data,
            expected=expected,
            late=late,
            superseded=superseded,
        )
        if status == "pending" or superseded:
            continue
        key = (
            at.astimezone(PP).date().isoformat(),
            currency if status != "failed" else None,
            to if status != "failed" else None,
        )
        row = want[key]
        if status == "success":
            row["paidCount"] += 1
            row["paidAmount"] += amount
            row["lateCount"] += late
        else:
            row[f"{status}Count"] += 1
            if status == "mismatch":
                row["mismatchAmount"] += amount

    status_code, body = await gateway.get("/api/v1/reports/daily?from=2026-11-10&to=2026-11-13")
    assert status_code == 200, body
    assert body["timezone"] == "Asia/Phnom_Penh"
    got = {(r["day"], r["currency"], r["account"]): r for r in body["data"]}
    assert set(got) == set(want)
    for key, expected_row in want.items():
        for name, value in expected_row.items():
            assert Decimal(str(got[key][name])) == value, (key, name)

    _, one_day = await gateway.get("/api/v1/reports/daily?from=2026-11-11&to=2026-11-11")
    assert {r["day"] for r in one_day["data"]} == {"2026-11-11"}


async def test_daily_report_is_one_query_on_the_index_of_completed_times(
    gateway: Gateway, pg: asyncpg.Connection
) -> None:
    from khqr_gateway.transactions import exports

    await pg.execute("analyze transactions")  # as in production: no stale estimate
    await pg.execute("set enable_seqscan = off")
    plan = await pg.fetchval(
        "explain (format json) " + exports.DAILY_REPORT_SQL,
        datetime(2026, 11, 1).date(),
        datetime(2026, 11, 7).date(),
        DEFAULT_APP_ID,
    )
    # One range read of an index on completion times (transactions_finished), whatever
    # else the planner weighs: never a scan, never a query per day.
    text = str(plan)
    assert "Seq Scan" not in text and "completed_at" in text and "Index" in text, text


async def test_daily_report_refuses_bad_days(gateway: Gateway) -> None:
    for query in ("from=2026-11-05&to=2026-11-01", "from=2020-01-01&to=2026-01-01", "to=x"):
        status, body = await gateway.get(f"/api/v1/reports/daily?{query}")
        assert status == 422, (query, body)
        assert body["error"]["code"] == "validation_error"


async def test_hourly_figures_count_payments_and_webhook_outcomes_of_the_last_day(
    gateway: Gateway, pg: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    hour_ago = now - timedelta(hours=1)
    for at, status in ((now, "success"), (now, "mismatch"), (hour_ago, "success")):
        await insert(pg, status=status, completed_at=at, data=paid(1))
    await insert(pg, status="success", completed_at=now - timedelta(hours=30), data=paid(1))
    await insert(pg, status="timeout", completed_at=now)
    job = await insert(pg, status="success", completed_at=now, data=paid(2))
    for n, status in enumerate(("delivered", "delivered", "failed", "pending")):
        await pg.execute(
            "insert into deliveries (id, transaction_id, url, payload, status, attempt_count)"
            " values ($1, $2, 'http://x', '{}', $3, 1)",
            f"msg_{n}",
            uuid.UUID(job),
            status,
        )
    status, body = await gateway.get("/api/v1/reports/hourly")
    assert status == 200, body
    hours = body["data"]
    assert len(hours) == 24
    assert [h["hour"] for h in hours] == sorted(h["hour"] for h in hours)
    last = hours[-1]
    assert (last["paid"], last["mismatch"]) == (2, 1)
    assert hours[-2]["paid"] == 1
    assert sum(h["paid"] for h in hours) == 3, "30 hours ago is outside the day"
    assert (last["delivered"], last["failed"], last["retrying"]) == (2, 1, 1)


async def test_hourly_figures_show_the_highest_poll_lag_the_gateway_saw_each_hour(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(run_ticks=False)
    service = gateway.service
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    await service.polls.add([(str(uuid.uuid4()), now_ms - 4_200)])
    await service.refresh_figures()
    await service.polls.add([(str(uuid.uuid4()), now_ms - 1_000)])
    await service.refresh_figures()  # a lower lag later in the hour: the peak stays
    status, body = await gateway.get("/api/v1/reports/hourly")
    assert status == 200, body
    *earlier, last = body["data"]
    assert 4.2 <= last["pollLagSeconds"] < 10, last
    assert all(h["pollLagSeconds"] is None for h in earlier), "no gateway ran those hours"


async def test_one_app_holds_one_export_slot_and_another_app_still_exports(
    gateway: Gateway, pg: asyncpg.Connection
) -> None:
    """An export held open by a slow reader (the default app's) takes one of the process's
    two slots: a second of that app waits its turn (429), another app's runs."""
    from khqr_gateway.apps import store as apps

    _, key, webhook_secret = await apps.create(gateway.service.pool, "Noodle Bar")
    secret(key.key)
    secret(webhook_secret)
    other = {"Authorization": f"Bearer {key.key}"}
    # About 12 MB of CSV: more than the sockets between us buffer, so an unread export waits.
    await pg.execute(
        """
        insert into transactions (id, md5, status, webhook_url, deadline_at, completed_at,
            metadata)
        select gen_random_uuid(), md5(n::text), 'success', 'http://x/hook', now(), now(),
               json_build_object('note', repeat('x', 2000))
        from generate_series(1, 6000) n
        """
    )
    path = "/api/v1/transactions/export"
    held = await gateway.client.get(path, headers=gateway.headers)
    assert held.status == 200
    try:
        again = await gateway.client.get(path, headers=gateway.headers)
        assert again.status == 429, again.status
        body = await again.json()
        assert body["error"]["code"] == "export_busy" and "this app" in body["error"]["message"]
        assert again.headers["Retry-After"] == "5"
        theirs = await gateway.client.get(path, headers=other)
        assert theirs.status == 200
        assert (await theirs.read()).count(b"\n") == 1, "the header: none of the rows is theirs"
    finally:
        held.close()
    # The slot is the app's again once its export ended.
    deadline = asyncio.get_running_loop().time() + 5
    while (
        resp := await gateway.client.get(path + "?status=failed", headers=gateway.headers)
    ).status == 429:
        assert asyncio.get_running_loop().time() < deadline, "the slot was never given back"
        await asyncio.sleep(0.1)
    assert resp.status == 200
