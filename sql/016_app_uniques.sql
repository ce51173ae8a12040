-- migrate: no transaction
-- One md5 is one payment of one app, and an Idempotency-Key is the app's own: the indexes
-- that made them unique across every app go, now that every process inserts against the
-- app's own (transactions_app_md5, idempotency_keys_app, made by 015). Until then a second
-- app posting an md5 another app tracks, or reusing its Idempotency-Key, hit a conflict.
drop index concurrently if exists transactions_one_md5;
alter table idempotency_keys drop constraint if exists idempotency_keys_pkey;
