-- The usage ledger: tokens and requests per key per UTC day, the durable record behind every
-- budget. Redis holds the live counters; after Redis loses its data they are rebuilt from
-- here (budgets.py). The gateway adds to these rows in batches at least once a second.
-- Keys and tenants with usage cannot be deleted (revoke keys instead), so budgets never
-- lose spend.

CREATE TABLE usage_daily (
    key_id             bigint NOT NULL REFERENCES api_keys (id) ON DELETE RESTRICT,
    day                date NOT NULL,
    tenant_id          bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    requests           bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    prompt_tokens      bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens  bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    PRIMARY KEY (key_id, day)
);

CREATE INDEX usage_daily_tenant_day ON usage_daily (tenant_id, day);
