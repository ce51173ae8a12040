-- Counts by status per app: an app's stats show its own transactions and deliveries only.
-- The counts so far are the default app's: no other app could make a row before apps were
-- authenticated (the column's default puts them there).
-- Writers wait while the triggers change: no row is counted under the old shape and the new.
-- They wait at most this long behind a long transaction: the migration fails, and a process
-- starting runs it again.
set local lock_timeout = '5s';
lock table transactions, deliveries in share row exclusive mode;
alter table status_counts add column app_id text not null default 'app_default';
alter table status_counts drop constraint status_counts_pkey;
alter table status_counts add primary key (app_id, kind, status);
alter table status_count_changes add column app_id text not null default 'app_default';

create or replace function khqr_count_transactions() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into status_count_changes (app_id, kind, status, n)
        select r.app_id, c.kind, c.status, count(*) from new_rows r
        cross join lateral (values ('transactions', r.status),
                                   ('late', case when r.late then r.status end)) c (kind, status)
        where c.status is not null group by 1, 2, 3;
    elsif tg_op = 'DELETE' then
        insert into status_count_changes (app_id, kind, status, n)
        select r.app_id, c.kind, c.status, -count(*) from old_rows r
        cross join lateral (values ('transactions', r.status),
                                   ('late', case when r.late then r.status end)) c (kind, status)
        where c.status is not null group by 1, 2, 3;
    else
        insert into status_count_changes (app_id, kind, status, n)
        select r.app_id, c.kind, c.status, sum(r.n)
        from (select 1 as n, app_id, status, late from new_rows
              union all select -1, app_id, status, late from old_rows) r
        cross join lateral (values ('transactions', r.status),
                                   ('late', case when r.late then r.status end)) c (kind, status)
        where c.status is not null group by 1, 2, 3 having sum(r.n) <> 0;
    end if;
    return null;
end $$;

create or replace function khqr_count_deliveries() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into status_count_changes (app_id, kind, status, n)
        select app_id, 'deliveries', status, count(*) from new_rows group by 1, 3;
    elsif tg_op = 'DELETE' then
        insert into status_count_changes (app_id, kind, status, n)
        select app_id, 'deliveries', status, -count(*) from old_rows group by 1, 3;
    else
        insert into status_count_changes (app_id, kind, status, n)
        select r.app_id, 'deliveries', r.status, sum(r.n)
        from (select 1 as n, app_id, status from new_rows
              union all select -1, app_id, status from old_rows) r
        group by 1, 3 having sum(r.n) <> 0;
    end if;
    return null;
end $$;
