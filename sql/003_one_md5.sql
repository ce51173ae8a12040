-- One md5 is one payment: one transaction per md5, whatever its status, so that a paid md5
-- posted again is never tracked (and reported paid) a second time.
-- Earlier versions tracked an md5 again once its transaction had ended. Of such rows, the one
-- that stays the md5's transaction is the paid one, else the pending one, else the newest; the
-- others are kept for their history and marked superseded, and one still pending is ended
-- (cancelled, no webhook): polling it would report a payment already reported.
alter table transactions add column superseded boolean not null default false;
with repeated as (
    select md5 from transactions group by md5 having count(*) > 1
), ranked as (
    select t.id, row_number() over (
        partition by t.md5
        order by t.status in ('success', 'mismatch') desc, t.status = 'pending' desc,
                 t.created_at desc, t.id desc
    ) as n
    from transactions t join repeated using (md5)
)
update transactions t set superseded = true from ranked where ranked.id = t.id and ranked.n > 1;
update transactions set status = 'cancelled', reason = 'superseded', completed_at = now(),
    updated_at = now()
where superseded and status = 'pending';
create unique index transactions_one_md5 on transactions (md5) where not superseded;
-- transactions_pending_md5 stays: a process of the previous version still running during a
-- rolling deploy inserts with `on conflict (md5) where status = 'pending'`, which needs it.
