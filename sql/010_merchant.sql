-- The merchant's side: exports and daily reports read by time range, search by `q=`.

-- The bill number (tag 62, sub-tag 01) of a KHQR string, walking its TLV fields; null when
-- there is none or the string is not TLV. Immutable, so that a generated column can use it.
create function khqr_bill_number(qr text) returns text
language plpgsql immutable parallel safe as $$
declare
    pos int := 1;
    len int;
    inner_value text;
    inner_pos int;
    inner_len int;
begin
    if qr is null then
        return null;
    end if;
    while pos + 3 <= length(qr) loop
        if substr(qr, pos + 2, 2) !~ '^[0-9]{2}$' then
            return null;
        end if;
        len := substr(qr, pos + 2, 2)::int;
        if substr(qr, pos, 2) = '62' then
            inner_value := substr(qr, pos + 4, len);
            inner_pos := 1;
            while inner_pos + 3 <= length(inner_value) loop
                if substr(inner_value, inner_pos + 2, 2) !~ '^[0-9]{2}$' then
                    return null;
                end if;
                inner_len := substr(inner_value, inner_pos + 2, 2)::int;
                if substr(inner_value, inner_pos, 2) = '01' then
                    return substr(inner_value, inner_pos + 4, inner_len);
                end if;
                inner_pos := inner_pos + 4 + inner_len;
            end loop;
            return null;
        end if;
        pos := pos + 4 + len;
    end loop;
    return null;
end $$;

-- What `q=` matches exactly (case-folded): the bill number and every string or number in the
-- metadata, at any depth. A set of terms in one GIN index: one lookup whatever the key.
create function khqr_search_terms(metadata json, qr text) returns text[]
language sql immutable parallel safe as $$
    select coalesce(array_agg(distinct term), '{}') from (
        select lower(khqr_bill_number(qr)) as term
        union all
        select lower(value #>> '{}') from jsonb_path_query(
            coalesce(metadata::jsonb, 'null'),
            'strict $.** ? (@.type() == "string" || @.type() == "number")'
        ) as value
    ) terms where term is not null and term <> ''
$$;

alter table transactions
    add column bill_number text generated always as (khqr_bill_number(qr)) stored,
    add column search_terms text[] generated always as (khqr_search_terms(metadata, qr)) stored;
create index transactions_search on transactions using gin (search_terms);
-- An md5 prefix is a range of this index whatever the database's collation.
create index transactions_md5_prefix on transactions (md5 text_pattern_ops);
-- Exports and daily reports read a time range: created_at (exports) has its index already;
-- the day a payment or failure counts for is the day it completed, read through
-- transactions_finished (completed_at, id) of 007, which retention also uses.
