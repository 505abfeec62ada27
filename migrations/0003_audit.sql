-- The audit log: one row of metadata per request that reached authentication. Never a
-- secret, never prompt or answer text. Partitioned by month so retention is a DROP of whole
-- partitions, not a DELETE that bloats the table; the gateway creates partitions ahead and
-- drops expired ones (audit.py). The default partition only catches rows no monthly
-- partition covers yet.

CREATE TABLE request_log (
    created_at         timestamptz NOT NULL,
    request_id         text NOT NULL,
    tenant_id          bigint,
    key_prefix         text,
    client_addr        inet,
    method             text NOT NULL,
    route              text NOT NULL,
    model              text,
    backend            text,
    status             smallint NOT NULL,
    error_code         text,
    stream             boolean NOT NULL DEFAULT false,
    prompt_tokens      integer NOT NULL DEFAULT 0,
    completion_tokens  integer NOT NULL DEFAULT 0,
    bytes_in           bigint NOT NULL DEFAULT 0,
    bytes_out          bigint NOT NULL DEFAULT 0,
    ttfb_ms            real,
    duration_ms        real NOT NULL,
    disconnected       boolean NOT NULL DEFAULT false,
    -- Retried batches insert ON CONFLICT DO NOTHING against this: a record is written once.
    UNIQUE (request_id, created_at)
) PARTITION BY RANGE (created_at);

CREATE TABLE request_log_default PARTITION OF request_log DEFAULT;

CREATE INDEX request_log_tenant_time ON request_log (tenant_id, created_at DESC);
CREATE INDEX request_log_key_time ON request_log (key_prefix, created_at DESC);
CREATE INDEX request_log_time ON request_log (created_at DESC);

-- Prompts and answers, only for keys that opted in (api_keys.log_prompts), each row with
-- its own expiry (api_keys.prompt_ttl_days at the time of the request). Expired rows are
-- deleted by the gateway in the background and by `purge-prompts`.
CREATE TABLE prompt_log (
    created_at  timestamptz NOT NULL,
    request_id  text NOT NULL,
    tenant_id   bigint NOT NULL,
    key_prefix  text NOT NULL,
    model       text,
    expires_at  timestamptz NOT NULL,
    request     jsonb NOT NULL,
    response    text NOT NULL,
    PRIMARY KEY (request_id, created_at)
);

CREATE INDEX prompt_log_expires ON prompt_log (expires_at);
CREATE INDEX prompt_log_key_time ON prompt_log (key_prefix, created_at DESC);
