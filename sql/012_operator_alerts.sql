-- Operator alerts: whether each is firing, shared by every process, so that an episode is
-- announced once (and its end once) however many processes see it.
create table operator_alerts (
    kind       text primary key,
    firing     boolean not null,
    detail     text,
    changed_at timestamptz not null default now()
);
