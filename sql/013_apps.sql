-- Apps (tenants): each backend that uses the gateway has its own keys, webhook secrets and
-- settings. The default app stands for what the environment configures (API_KEY,
-- WEBHOOK_SECRET, BAKONG_*, KHQR_*, TELEGRAM_*): its row holds no key and no secret.
create table apps (
    id                   text primary key,
    name                 text not null,
    webhook_url          text,
    -- {accountId, merchantName, merchantCity}: the profile POST /api/v1/khqr encodes.
    merchant             jsonb,
    credential_id        bigint references credentials (id),
    telegram_chat_id     text,
    -- Needed in clear to call the Bot API; never in a list, a log line or a metric.
    telegram_bot_token   text,
    rate_limit           integer check (rate_limit > 0),
    disabled_at          timestamptz,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now()
);
-- A name finds its app from the command line (`khqr-gateway apps key NAME`).
create unique index apps_name on apps (lower(name)) where disabled_at is null;
insert into apps (id, name) values ('app_default', 'default') on conflict do nothing;

create table api_keys (
    id            text primary key,
    app_id        text not null references apps (id),
    -- SHA-256 of the key: a key is 32 random bytes or more, so a slow hash adds nothing.
    key_hash      bytea not null unique,
    -- The first characters, to tell keys apart in a list (`kgw_AbCd...`).
    prefix        text not null,
    created_at    timestamptz not null default now(),
    expires_at    timestamptz,
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
create index api_keys_app on api_keys (app_id, created_at, id);

-- Webhook secrets sign, so they are kept; each is shown once, when made. The newest signs;
-- one replaced less than the rotation window ago signs beside it.
create table webhook_secrets (
    id          bigserial primary key,
    app_id      text not null references apps (id),
    secret      text not null,
    created_at  timestamptz not null default now(),
    replaced_at timestamptz
);
create index webhook_secrets_app on webhook_secrets (app_id, id desc);
