"""Postgres: the asyncpg pool and the numbered migrations of `sql/`, applied under a lock."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import orjson

log = logging.getLogger(__name__)

# Any fixed number works; it only has to be the same in every process of this service.
MIGRATION_LOCK_ID = 0x6B687172
_MIGRATION_NAME = re.compile(r"^(\d{3,})_[\w-]+\.sql$")

# What Postgres refuses because of one row's content (bad text, a broken constraint), as
# opposed to trouble with Postgres itself, which fails every row alike.
ROW_FAULTS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Row = TypeVar("Row")
Result = TypeVar("Result")
Value = TypeVar("Value", bound="DataclassInstance")


# A migration that starts with this line runs statement by statement outside a transaction,
# so that `create index concurrently` builds an index on a large table without stopping
# writes. Each statement must then be safe to run again: a crash between two of them
# re-runs the whole migration at the next start.
NO_TRANSACTION = "-- migrate: no transaction"
_CONCURRENT_INDEX = re.compile(
    r"^\s*create\s+(?:unique\s+)?index\s+concurrently\s+if\s+not\s+exists\s+(\w+)", re.I
)
_ANY_INDEX = re.compile(r"^\s*create\s+(?:unique\s+)?index\b", re.I)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def in_transaction(self) -> bool:
        return not self.sql.lstrip().startswith(NO_TRANSACTION)

    def statements(self) -> list[str]:
        """The statements of a no-transaction migration (its files hold no `;` but at ends)."""
        body = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return [s.strip() for s in body.split(";") if s.strip()]

    def check(self) -> None:
        """Refuse, before anything runs, a no-transaction migration that could not run twice."""
        if self.in_transaction:
            return
        for statement in self.statements():
            if _ANY_INDEX.match(statement) and not _CONCURRENT_INDEX.match(statement):
                raise RuntimeError(
                    f"{self.name}: outside a transaction an index is made with"
                    " `create index concurrently if not exists`"
                )


def migrations_dir() -> Path:
    """The `sql/` folder next to the package (source checkout or the container's /app)."""
    candidates = [Path(__file__).resolve().parents[2] / "sql", Path.cwd() / "sql"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the sql/ migrations folder was not found next to the package")


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or migrations_dir()
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), path.stem, path.read_text()))
            found[-1].check()
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number in {folder}")
    return found


async def migrate(conn: asyncpg.Connection, folder: Path | None = None) -> list[str]:
    """Apply the migrations not yet applied; safe when several processes start at once."""
    applied_now: list[str] = []
    await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            "create table if not exists schema_migrations ("
            " version integer primary key, name text not null,"
            " applied_at timestamptz not null default now())"
        )
        done = {r["version"] for r in await conn.fetch("select version from schema_migrations")}
        for migration in load_migrations(folder):
            if migration.version in done:
                continue
            await _apply(conn, migration)
            applied_now.append(migration.name)
            log.info("migration applied", extra={"migration": migration.name})
    finally:
        await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    record = "insert into schema_migrations (version, name) values ($1, $2)"
    if migration.in_transaction:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(record, migration.version, migration.name)
        return
    for statement in migration.statements():
        await _drop_if_invalid(conn, statement)
        await conn.execute(statement)
    await conn.execute(record, migration.version, migration.name)


async def _drop_if_invalid(conn: asyncpg.Connection, statement: str) -> None:
    """A concurrent build that failed (or was killed) leaves an invalid index behind, which
    `if not exists` would keep: drop it so that the statement builds it again."""
    match = _CONCURRENT_INDEX.match(statement)
    if match is None:
        return
    valid = await conn.fetchval(
        "select i.indisvalid from pg_class c join pg_index i on i.indexrelid = c.oid"
        " where c.relname = $1 and pg_table_is_visible(c.oid)",
        match.group(1),
    )
    if valid is False:
        log.warning("rebuilding an index a failed build left invalid: %s", match.group(1))
        await conn.execute(f'drop index concurrently if exists "{match.group(1)}"')


async def migrate_database(dsn: str) -> list[str]:
    """`migrate` on a connection of its own, never one of the pool's (see `_no_reset`)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb as Python values through orjson; `json` columns keep the text as sent.
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def _no_reset(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset on release (`SELECT pg_advisory_unlock_all(); CLOSE ALL;
    # UNLISTEN *; RESET ALL`) is one more round trip per query, and it undoes session state
    # we never leave on a pooled connection: no advisory lock (migrations take theirs on a
    # connection of their own), no cursor outside a transaction, no LISTEN (events go through
    # Redis), no SET. asyncpg still rolls back an open transaction before calling this.
    return None


class FairPool(asyncpg.Pool):  # type: ignore[misc]  # asyncpg ships no types
    """An asyncpg pool that hands out its connections in the order they were asked for.

    asyncpg's own queue is not fair: a connection put back wakes the first waiter, but a
    caller that asks before that waiter has run takes it, and the waiter goes to the back
    of the line (asyncio.Queue.get). With more requests than connections some wait turn
    after turn: the list route's p99 was 20-70x its p50 at 50 connections. One permit per
    connection, taken from a FIFO semaphore (fair since Python 3.11.1), is one line for all.
    """

    def __init__(self, *args: Any, max_size: int, **kwargs: Any) -> None:
        super().__init__(*args, max_size=max_size, **kwargs)
        self._turns = asyncio.Semaphore(max_size)
        self._holding: set[int] = set()

    async def _acquire(self, timeout: float | None) -> Any:  # noqa: ASYNC109 (asyncpg's)
        if timeout is None:
            await self._turns.acquire()
        else:
            await asyncio.wait_for(self._turns.acquire(), timeout)
        try:
            proxy = await super()._acquire(timeout)
        except BaseException:
            self._turns.release()
            raise
        self._holding.add(id(proxy))
        return proxy

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        try:
            await super().release(connection, timeout=timeout)
        finally:
            # Released twice (asyncpg allows it) gives the permit back once.
            if id(connection) in self._holding:
                self._holding.discard(id(connection))
                self._turns.release()


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """A fair pool whose connections speak JSON through orjson, not reset on release."""
    pool = FairPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        init=_init_connection,
        reset=_no_reset,
        command_timeout=30,
        server_settings={"application_name": "khqr-gateway"},
    )
    await pool
    return pool


def safe_text(value: str | None) -> str | None:
    """Text that a Postgres `text` or `jsonb` value can hold: a NUL and anything UTF-8 cannot
    encode (lone surrogates) become U+FFFD. For what others send us (receivers, Bakong)."""
    if value is None:
        return None
    if value.isascii():
        return value.replace("\x00", "\ufffd")
    return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


async def write_isolated(
    write: Callable[[Sequence[Row]], Awaitable[list[Result]]], rows: Sequence[Row]
) -> tuple[list[Result], list[tuple[Row, Exception]]]:
    """Write `rows` in one statement; if Postgres refuses it for a row's content, write them
    one at a time, so that one bad row fails only itself.

    Returns what the writes returned and each refused row with its error. Trouble with
    Postgres itself (unreachable, shutting down) raises, as one statement would.
    """
    try:
        return await write(rows), []
    except ROW_FAULTS as exc:
        if len(rows) <= 1:
            return [], [(row, exc) for row in rows]
        log.warning("a batch of %d rows was refused, writing them one by one: %s", len(rows), exc)
    results: list[Result] = []
    refused: list[tuple[Row, Exception]] = []
    for row in rows:
        try:
            results += await write([row])
        except ROW_FAULTS as exc:
            refused.append((row, exc))
    return results, refused


async def ping(pool: asyncpg.Pool) -> None:
    """Raises unless Postgres answers a query through `pool`."""
    await pool.fetchval("select 1")


def conditions(filters: Sequence[tuple[str, Any]], args: list[Any]) -> list[str]:
    """The SQL condition of each `(column op, value)` whose value is not None, the value
    added to `args` as the next parameter: after the operator, or wherever the condition
    says `{}` (a condition that names its value more than once)."""
    found: list[str] = []
    for condition, value in filters:
        if value is not None:
            args.append(value)
            at = f"${len(args)}"
            found.append(condition.replace("{}", at) if "{}" in condition else f"{condition} {at}")
    return found


def row_as(kind: type[Value], row: Mapping[str, Any], **given: Any) -> Value:
    """The typed row `kind` (a dataclass) of a record: each field from the column of its
    name, unless `given`; a field with a default may have no column."""
    columns = {name: row[name] for name in _fields(kind) if name not in given and name in row}
    return kind(**columns, **given)


@functools.cache
def _fields(kind: type[DataclassInstance]) -> tuple[str, ...]:
    # Read once per type: the poll tick makes thousands of rows a second.
    return tuple(f.name for f in dataclasses.fields(kind))
