-- One md5 is one payment: one transaction per md5, whatever its status, so that a paid md5
-- posted again is never tracked (and reported paid) a second time.
-- Earlier versions tracked an md5 again once its transaction had ended. Of such rows, the one
-- that stays the md5's transaction is the paid one, else the pending one, else the newest; the
-- others are kept for their history and marked superseded.
alter table transactions add column superseded boolean not null default false;
with ranked as (
    select id, row_number() over (
        partition by md5
        order by status in ('success', 'mismatch') desc, status = 'pending' desc,
                 created_at desc, id desc
    ) as n
    from transactions
)
update transactions t set superseded = true from ranked where ranked.id = t.id and ranked.n > 1;
create unique index transactions_one_md5 on transactions (md5) where not superseded;
drop index transactions_pending_md5;
