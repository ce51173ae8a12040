-- A credential is its app's own: the same token or email sent by two apps is two rows, so
-- that one app can never replace (or read the state of) another's credential.
-- Writers wait at most this long for the lock; a deploy that cannot get it fails and retries.
set local lock_timeout = '5s';
create unique index credentials_app_fingerprint on credentials (app_id, fingerprint);
alter table credentials drop constraint credentials_fingerprint_key;
