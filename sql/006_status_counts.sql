-- Counts by status kept as rows change, so that the figures tick (stats, /metrics) reads a
-- few rows instead of counting every transaction and delivery ever made.
-- Kinds: 'transactions' and 'deliveries' by status, 'late' (late payments) by status.
create table status_counts (
    kind   text not null,
    status text not null,
    n      bigint not null,
    primary key (kind, status)
);
-- Each write statement appends its net change here instead of updating status_counts: an
-- append takes no row lock, so concurrent writers never queue (or deadlock) on a counter
-- row. The figures tick folds the changes into status_counts; a read sums both.
create table status_count_changes (
    kind   text not null,
    status text not null,
    n      bigint not null
);

-- Statement-level triggers, from the transition tables: one small insert per statement,
-- however many rows it wrote; rows whose status did not change cancel out. A function may
-- only name the transition tables its trigger declares, hence one query per operation
-- (plpgsql plans a statement when it first runs, so the others are never planned).
create function khqr_count_transactions() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into status_count_changes (kind, status, n)
        select c.kind, c.status, count(*) from new_rows r
        cross join lateral (values ('transactions', r.status),
                                   ('late', case when r.late then r.status end)) c (kind, status)
        where c.status is not null group by 1, 2;
    elsif tg_op = 'DELETE' then
        insert into status_count_changes (kind, status, n)
        select c.kind, c.status, -count(*) from old_rows r
        cross join lateral (values ('transactions', r.status),
                                   ('late', case when r.late then r.status end)) c (kind, status)
        where c.status is not null group by 1, 2;
    else
        insert into status_count_changes (kind, status, n)
        select c.kind, c.status, sum(r.n)
        from (select 1 as n, status, late from new_rows
              union all select -1, status, late from old_rows) r
        cross join lateral (values ('transactions', r.status),
                                   ('late', case when r.late then r.status end)) c (kind, status)
        where c.status is not null group by 1, 2 having sum(r.n) <> 0;
    end if;
    return null;
end $$;

create function khqr_count_deliveries() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into status_count_changes (kind, status, n)
        select 'deliveries', status, count(*) from new_rows group by 2;
    elsif tg_op = 'DELETE' then
        insert into status_count_changes (kind, status, n)
        select 'deliveries', status, -count(*) from old_rows group by 2;
    else
        insert into status_count_changes (kind, status, n)
        select 'deliveries', r.status, sum(r.n)
        from (select 1 as n, status from new_rows
              union all select -1, status from old_rows) r
        group by 2 having sum(r.n) <> 0;
    end if;
    return null;
end $$;

-- A truncate fires no row trigger: it empties the counts of the kinds named.
create function khqr_count_reset() returns trigger language plpgsql as $$
begin
    delete from status_counts where kind = any (tg_argv);
    delete from status_count_changes where kind = any (tg_argv);
    return null;
end $$;

-- Writers (a previous version's, during a rolling deploy) wait from the moment the
-- triggers exist until the first counts are in: no row is counted twice or missed.
lock table transactions, deliveries in share row exclusive mode;

create trigger transactions_counted_insert after insert on transactions
    referencing new table as new_rows
    for each statement execute function khqr_count_transactions();
create trigger transactions_counted_update after update on transactions
    referencing old table as old_rows new table as new_rows
    for each statement execute function khqr_count_transactions();
create trigger transactions_counted_delete after delete on transactions
    referencing old table as old_rows
    for each statement execute function khqr_count_transactions();
create trigger transactions_counted_truncate after truncate on transactions
    for each statement execute function khqr_count_reset('transactions', 'late');

create trigger deliveries_counted_insert after insert on deliveries
    referencing new table as new_rows
    for each statement execute function khqr_count_deliveries();
create trigger deliveries_counted_update after update on deliveries
    referencing old table as old_rows new table as new_rows
    for each statement execute function khqr_count_deliveries();
create trigger deliveries_counted_delete after delete on deliveries
    referencing old table as old_rows
    for each statement execute function khqr_count_deliveries();
create trigger deliveries_counted_truncate after truncate on deliveries
    for each statement execute function khqr_count_reset('deliveries');

insert into status_counts (kind, status, n)
select 'transactions', status, count(*) from transactions group by status
union all
select 'late', status, count(*) from transactions where late group by status
union all
select 'deliveries', status, count(*) from deliveries group by status;
