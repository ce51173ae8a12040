-- The hosted payment page: a per-transaction token (its sha256 only) and where to go once paid.
alter table transactions add column page_token_hash text;
alter table transactions add column return_url text;
