-- Telegram notices of payments: one per paid (or mismatched) transition, durable, leased in
-- Postgres (a message per payment is few, and Redis losing its keys must not lose one).
create table telegram_notices (
    id               bigserial primary key,
    transaction_id   uuid not null references transactions (id),
    -- A late payment is a second transition of its transaction, and a second notice.
    late             boolean not null,
    chat_id          text not null,
    status           text not null default 'pending' check (status in ('pending', 'sent', 'failed')),
    attempt_count    integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    lease_until      timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz not null default now(),
    sent_at          timestamptz,
    unique (transaction_id, late)
);
create index telegram_notices_due on telegram_notices (next_attempt_at) where status = 'pending';
create index telegram_notices_created on telegram_notices (created_at);

create table telegram_attempts (
    id            bigserial primary key,
    notice_id     bigint not null references telegram_notices (id),
    attempt       integer not null,
    started_at    timestamptz not null,
    duration_ms   integer not null,
    status_code   integer,
    error         text,
    response_body text
);
create index telegram_attempts_notice on telegram_attempts (notice_id, attempt);
