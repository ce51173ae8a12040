-- Late payments: a QR stays payable at Bakong until its own expiry, so after a timeout or a
-- cancel the md5 is still watched until `late_watch_until`; a payment found then moves the
-- transaction once more (`late`, from `previous_status`) and sends one more webhook.
alter table transactions add column qr_expires_at timestamptz;
alter table transactions add column late_watch_until timestamptz;
alter table transactions add column late boolean not null default false;
alter table transactions add column previous_status text
    check (previous_status in ('timeout', 'cancelled'));
-- What timed out or was cancelled within the last hour (the default LATE_WATCH_S) before
-- this version is watched too: the reconcile tick schedules these.
update transactions set late_watch_until = case
        when status = 'timeout' then deadline_at else completed_at end + interval '1 hour'
where status in ('timeout', 'cancelled') and completed_at > now() - interval '1 hour';
-- The watches still running, for the reconcile tick: ended ones drop out of the range scan.
create index transactions_late_watch on transactions (late_watch_until, id)
    where status in ('timeout', 'cancelled');

-- Late payments are few: counted by this index alone (stats, dashboard).
create index transactions_late on transactions (completed_at) where late;

-- A late payment is a second webhook of its transaction.
alter table deliveries drop constraint deliveries_transaction_id_key;
create index deliveries_transaction on deliveries (transaction_id, created_at desc, id desc);
