-- migrate: no transaction
-- The indexes of queries scoped to an app, built without locking writes out. Until every
-- process runs the scoped code, the md5 and Idempotency-Key indexes of one app only
-- (transactions_one_md5, idempotency_keys_pkey) stay: an older process inserts against them.
-- One md5 is one payment of one app: another app's same md5 is its own transaction.
create unique index concurrently if not exists transactions_app_md5
    on transactions (app_id, md5) where not superseded;
-- An Idempotency-Key is the app's own.
create unique index concurrently if not exists idempotency_keys_app
    on idempotency_keys (app_id, key_hash);
-- Keyset pages of one app, newest first, with or without a status or an md5.
create index concurrently if not exists transactions_app_created
    on transactions (app_id, created_at desc, id desc);
create index concurrently if not exists transactions_app_status_created
    on transactions (app_id, status, created_at desc, id desc);
create index concurrently if not exists deliveries_app_created
    on deliveries (app_id, created_at desc, id desc);
create index concurrently if not exists deliveries_app_status_created
    on deliveries (app_id, status, created_at desc, id desc);
-- Kept by 003 for processes from before it, which no deploy runs any more; transactions_one_md5
-- holds all it held, and it would make one md5 pending in two apps a conflict.
drop index concurrently if exists transactions_pending_md5;
