-- Transactions, their webhook deliveries and attempts, Bakong credentials, idempotency keys.

create table credentials (
    id           bigserial primary key,
    -- sha256 of the token (token credentials) or of the lowercased email (email credentials):
    -- the same credential sent twice is one row.
    fingerprint  text not null unique,
    email        text,
    token        text,
    expires_at   timestamptz,
    status       text not null default 'active' check (status in ('active', 'expired')),
    is_default   boolean not null default false,
    last_error   text,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now()
);
create unique index credentials_one_default on credentials (is_default) where is_default;

create table transactions (
    id            uuid primary key,
    md5           text not null check (md5 ~ '^[0-9a-f]{32}$'),
    status        text not null default 'pending'
                  check (status in ('pending', 'success', 'failed', 'timeout', 'mismatch', 'cancelled')),
    reason        text,
    webhook_url   text not null,
    credential_id bigint references credentials (id),
    expected      jsonb,
    metadata      json,
    qr            text,
    bakong_data   json,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    deadline_at   timestamptz not null,
    completed_at  timestamptz
);
-- One pending transaction per md5: a second POST of the same md5 returns the first.
create unique index transactions_pending_md5 on transactions (md5) where status = 'pending';
create index transactions_md5 on transactions (md5, created_at desc, id desc);
create index transactions_created on transactions (created_at desc, id desc);
create index transactions_status_created on transactions (status, created_at desc, id desc);
create index transactions_pending_deadline on transactions (deadline_at) where status = 'pending';

create table deliveries (
    id               text primary key,
    transaction_id   uuid not null unique references transactions (id),
    url              text not null,
    payload          bytea not null,
    status           text not null default 'pending'
                     check (status in ('pending', 'delivered', 'failed')),
    attempt_count    integer not null default 0,
    -- attempts made in the current series; a manual retry starts a new series
    series_attempts  integer not null default 0,
    next_attempt_at  timestamptz,
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    delivered_at     timestamptz
);
create index deliveries_created on deliveries (created_at desc, id desc);
create index deliveries_status_created on deliveries (status, created_at desc, id desc);
create index deliveries_pending_next on deliveries (next_attempt_at) where status = 'pending';

create table delivery_attempts (
    id               bigserial primary key,
    delivery_id      text not null references deliveries (id),
    attempt          integer not null,
    started_at       timestamptz not null,
    duration_ms      integer not null,
    status_code      integer,
    error_kind       text,
    error_message    text,
    response_body    text,
    response_headers jsonb
);
create index delivery_attempts_delivery on delivery_attempts (delivery_id, attempt);

create table idempotency_keys (
    key_hash     text primary key,
    request_hash text not null,
    status_code  integer,
    response     bytea,
    created_at   timestamptz not null default now()
);
create index idempotency_keys_created on idempotency_keys (created_at);
