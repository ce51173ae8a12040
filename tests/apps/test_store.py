"""The apps store on a real Postgres: keys kept as hashes only, found by one lookup, revoked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from khqr_gateway.apps import store
from khqr_gateway.apps.model import DEFAULT_APP_ID, Merchant, key_hash


@pytest.fixture
async def pool(database_url: str, pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    made = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield made
    await made.close()


async def dump(pg: asyncpg.Connection) -> str:
    """Every byte the gateway stores of apps and keys, as text."""
    rows = await pg.fetch(
        "select a::text as t from apps a union all select k::text from api_keys k"
        " union all select encode(key_hash, 'escape') from api_keys"
    )
    return "\n".join(r["t"] for r in rows)


async def test_an_app_is_made_with_one_key_and_one_secret_and_the_key_is_never_stored(
    pool: asyncpg.Pool, pg: asyncpg.Connection
) -> None:
    merchant = Merchant("shop@aclb", "Shop", "Phnom Penh")
    app, key, secret = await store.create(pool, "Shop", merchant=merchant, rate_limit=50)
    assert app.id.startswith("app_") and app.merchant == merchant and app.rate_limit == 50
    stored = await dump(pg)
    assert key.key not in stored and key.key[8:] not in stored
    found = await store.find_key(pool, key_hash(key.key))
    assert found is not None
    api_key, owner = found
    assert (api_key.id, owner.id, api_key.prefix) == (key.id, app.id, key.key[:8])
    assert await store.signing_secrets(pool, app.id, timedelta(hours=24)) == [secret]


async def test_a_key_of_one_app_finds_that_app_only(pool: asyncpg.Pool) -> None:
    shop, shop_key, _ = await store.create(pool, "Shop")
    pos, pos_key, _ = await store.create(pool, "POS")
    found_shop = await store.find_key(pool, key_hash(shop_key.key))
    found_pos = await store.find_key(pool, key_hash(pos_key.key))
    assert found_shop is not None and found_shop[1].id == shop.id
    assert found_pos is not None and found_pos[1].id == pos.id
    assert await store.find_key(pool, key_hash(shop_key.key + "x")) is None


async def test_revoking_is_per_app_and_keeps_the_first_moment(pool: asyncpg.Pool) -> None:
    shop, key, _ = await store.create(pool, "Shop")
    pos, _, _ = await store.create(pool, "POS")
    assert not await store.revoke_key(pool, pos.id, key.id), "another app's key is not found"
    assert await store.revoke_key(pool, shop.id, key.id)
    (first,) = await store.list_keys(pool, shop.id)
    assert await store.revoke_key(pool, shop.id, key.id)
    (again,) = await store.list_keys(pool, shop.id)
    assert first.revoked_at is not None and again.revoked_at == first.revoked_at
    assert not again.usable(datetime.now(UTC))
    assert await store.usable_key_counts(pool) == {pos.id: 1}


async def test_names_find_enabled_apps_in_any_case_and_ids_always(pool: asyncpg.Pool) -> None:
    shop, _, _ = await store.create(pool, "Coffee Shop")
    found = await store.find(pool, "coffee shop")
    assert found is not None and found.id == shop.id
    await store.disable(pool, shop.id)
    assert await store.find(pool, "Coffee Shop") is None
    by_id = await store.find(pool, shop.id)
    assert by_id is not None and by_id.disabled
    again, _, _ = await store.create(pool, "Coffee Shop")  # the name is free once disabled
    assert again.id != shop.id


async def test_two_enabled_apps_cannot_share_a_name(pool: asyncpg.Pool) -> None:
    await store.create(pool, "Shop")
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.create(pool, "SHOP")
    assert [a.name for a in await store.list_page(pool, after=None, limit=10)].count("Shop") == 1


async def test_a_rotated_secret_signs_beside_the_new_one_for_the_window(
    pool: asyncpg.Pool, pg: asyncpg.Connection
) -> None:
    app, _, first = await store.create(pool, "Shop")
    second = await store.rotate_secret(pool, app.id)
    assert await store.signing_secrets(pool, app.id, timedelta(hours=24)) == [second, first]
    await pg.execute(
        "update webhook_secrets set replaced_at = now() - interval '25 hours' where secret = $1",
        first,
    )
    assert await store.signing_secrets(pool, app.id, timedelta(hours=24)) == [second]


async def test_last_used_is_recorded_in_one_batch_and_never_goes_back(pool: asyncpg.Pool) -> None:
    app, first, _ = await store.create(pool, "Shop")
    second = await store.add_key(pool, app.id)
    later = datetime.now(UTC)
    earlier = later - timedelta(minutes=5)
    await store.touch_keys(pool, {first.id: later, second.id: earlier})
    await store.touch_keys(pool, {first.id: earlier})
    used = {k.id: k.last_used_at for k in await store.list_keys(pool, app.id)}
    assert used == {first.id: later, second.id: earlier}


async def test_apps_page_by_id_without_skipping_or_repeating(pool: asyncpg.Pool) -> None:
    made = {(await store.create(pool, f"app {i}"))[0].id for i in range(7)}
    seen: list[str] = []
    after = None
    while page := await store.list_page(pool, after=after, limit=3):
        seen += [a.id for a in page]
        after = page[-1].id
    assert set(seen) == made | {DEFAULT_APP_ID} and len(seen) == len(set(seen))


async def test_an_app_is_made_with_its_telegram_chat_and_bot_token(pool: asyncpg.Pool) -> None:
    app, _, _ = await store.create(
        pool, "Shop", telegram_chat_id="-1001234", telegram_bot_token="123:bot-token"
    )
    found = await store.get(pool, app.id)
    assert found is not None
    assert (found.telegram_chat_id, found.telegram_bot_token) == ("-1001234", "123:bot-token")


async def test_an_update_sets_what_it_names_and_clears_what_it_gives_as_none(
    pool: asyncpg.Pool,
) -> None:
    merchant = Merchant("shop@aclb", "Shop", "Phnom Penh")
    app, _, _ = await store.create(
        pool, "Shop", webhook_url="https://shop.example/hook", merchant=merchant, rate_limit=50
    )
    other = Merchant("pos@aclb", "POS", "Siem Reap")
    changed = await store.update(pool, app.id, {"name": "Shop 2", "merchant": other})
    assert changed is not None
    assert (changed.name, changed.merchant, changed.rate_limit) == ("Shop 2", other, 50)
    assert changed.webhook_url == "https://shop.example/hook"
    assert changed.updated_at is not None and app.updated_at is not None
    assert changed.updated_at > app.updated_at
    cleared = await store.update(pool, app.id, {"merchant": None, "rate_limit": None})
    assert cleared is not None and (cleared.merchant, cleared.rate_limit) == (None, None)
    assert await store.get(pool, app.id) == cleared


async def test_an_update_needs_an_enabled_app_and_a_free_name(pool: asyncpg.Pool) -> None:
    shop, _, _ = await store.create(pool, "Shop")
    bar, _, _ = await store.create(pool, "Bar")
    assert await store.update(pool, "app_nope", {"name": "x"}) is None
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.update(pool, bar.id, {"name": "shop"})
    await store.disable(pool, shop.id)
    assert await store.update(pool, shop.id, {"rate_limit": 5}) is None
    unchanged = await store.get(pool, shop.id)
    assert unchanged is not None and unchanged.rate_limit is None
    with pytest.raises(ValueError, match="disabled_at"):
        await store.update(pool, bar.id, {"disabled_at": None})


async def test_an_app_may_be_made_with_an_id_chosen_first_and_names_in_use_are_told(
    pool: asyncpg.Pool,
) -> None:
    assert not await store.name_in_use(pool, "Shop")
    app, _, _ = await store.create(pool, "Shop", app_id="app_chosen")
    assert app.id == "app_chosen"
    assert await store.name_in_use(pool, "SHOP") and await store.name_in_use(pool, "default")
    await store.disable(pool, app.id)
    assert not await store.name_in_use(pool, "shop")
