-- The language of an app's Telegram notices (the default app's: TELEGRAM_LANGUAGE). A
-- constant default adds the column without rewriting the table.
alter table apps add column if not exists telegram_language text not null default 'en'
    check (telegram_language in ('en', 'km'));
