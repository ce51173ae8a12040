-- Apps (tenants): every row an app makes names its app. Rows from before are the default
-- app's. A constant default is metadata only (Postgres 11+): instant however big the table.
alter table transactions add column app_id text not null default 'app_default';
alter table deliveries add column app_id text not null default 'app_default';
alter table idempotency_keys add column app_id text not null default 'app_default';
alter table credentials add column app_id text not null default 'app_default';
alter table telegram_notices add column app_id text not null default 'app_default';
