"""Idempotency-Key reservations on a real Postgres: a key is one app's own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from khqr_gateway.apps.model import DEFAULT_APP_ID
from khqr_gateway.infra import db
from khqr_gateway.infra.idempotency import (
    claim_idempotency_key,
    complete_idempotency_key,
    release_idempotency_key,
)

A = DEFAULT_APP_ID
B = "app_b"


@pytest.fixture
async def pool(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    made = await db.create_pool(database_url)
    yield made
    await made.close()


async def test_a_key_claimed_again_in_its_app_is_a_replay(pool: asyncpg.Pool) -> None:
    assert await claim_idempotency_key(pool, A, "k", "r") is None
    in_progress = await claim_idempotency_key(pool, A, "k", "r")
    assert in_progress is not None and in_progress.status_code is None
    await complete_idempotency_key(pool, A, "k", 201, b"{}")
    done = await claim_idempotency_key(pool, A, "k", "r")
    assert done is not None and (done.status_code, done.response) == (201, b"{}")


async def test_another_apps_key_is_not_a_replay(pool: asyncpg.Pool) -> None:
    assert await claim_idempotency_key(pool, A, "k", "r") is None
    await complete_idempotency_key(pool, A, "k", 201, b'{"a": 1}')
    assert await claim_idempotency_key(pool, B, "k", "r") is None
    await complete_idempotency_key(pool, B, "k", 200, b'{"b": 1}')
    mine = await claim_idempotency_key(pool, A, "k", "r")
    assert mine is not None and mine.response == b'{"a": 1}'


async def test_another_app_cannot_release_or_complete_a_key(pool: asyncpg.Pool) -> None:
    assert await claim_idempotency_key(pool, A, "k", "r") is None
    await release_idempotency_key(pool, B, "k")
    await complete_idempotency_key(pool, B, "k", 500, b"x")
    held = await claim_idempotency_key(pool, A, "k", "r")
    assert held is not None and held.status_code is None
