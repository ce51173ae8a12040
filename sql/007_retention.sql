-- migrate: no transaction
-- Retention: what the retention tick looks for, oldest first, without reading the rest.
-- Built concurrently: on a database with years of rows, a plain build would stop every
-- write to these tables for as long as it takes.
-- Final transactions by when they ended (a late payment ends one again, later).
create index concurrently if not exists transactions_finished on transactions (completed_at, id)
    where status <> 'pending';
-- Attempts whose response body is still kept; a blanked one drops out of the index.
create index concurrently if not exists delivery_attempts_body on delivery_attempts (started_at)
    where response_body is not null;
