-- Tenants and their API keys. Shared with neuronetz-console: columns are documented in the
-- README ("Database schema") and only ever change through new migrations.
--
-- Limits and budgets are nullable everywhere. On a tenant, NULL means unlimited; on a key,
-- NULL means "inherit the tenant's value". Both the key's and the tenant's limits apply.

CREATE TABLE tenants (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    rpm             integer CHECK (rpm > 0),
    tpm             integer CHECK (tpm > 0),
    max_concurrent  integer CHECK (max_concurrent > 0),
    daily_tokens    bigint CHECK (daily_tokens >= 0),
    monthly_tokens  bigint CHECK (monthly_tokens >= 0),
    total_tokens    bigint CHECK (total_tokens >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    -- The public part of the key, `nz_` + 8 lowercase alphanumerics: safe to log and show.
    prefix           text NOT NULL UNIQUE CHECK (prefix ~ '^nz_[a-z0-9]{8}$'),
    -- Argon2id of the whole key; the key itself is never stored.
    secret_hash      text NOT NULL CHECK (secret_hash LIKE '$argon2id$%'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    revoked_at       timestamptz,
    last_used_at     timestamptz,
    -- NULL: every model; otherwise the normalised names (`name:tag`) this key may use.
    allowed_models   text[],
    log_prompts      boolean NOT NULL DEFAULT false,
    prompt_ttl_days  integer CHECK (prompt_ttl_days > 0),
    rpm              integer CHECK (rpm > 0),
    tpm              integer CHECK (tpm > 0),
    max_concurrent   integer CHECK (max_concurrent > 0),
    daily_tokens     bigint CHECK (daily_tokens >= 0),
    monthly_tokens   bigint CHECK (monthly_tokens >= 0),
    total_tokens     bigint CHECK (total_tokens >= 0),
    UNIQUE (tenant_id, name),
    CHECK (NOT log_prompts OR prompt_ttl_days IS NOT NULL)
);

CREATE INDEX api_keys_tenant_id ON api_keys (tenant_id);

-- An update that changes nothing but last_used_at (written by the gateway itself, coalesced
-- to once a minute per key) is bookkeeping: it neither bumps updated_at nor notifies.
CREATE FUNCTION neuronetz_row_changed(old_row jsonb, new_row jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$
    SELECT (old_row - 'last_used_at' - 'updated_at') IS DISTINCT FROM (new_row - 'last_used_at' - 'updated_at')
$$;

CREATE FUNCTION neuronetz_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF neuronetz_row_changed(to_jsonb(OLD), to_jsonb(NEW)) THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER tenants_touch BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION neuronetz_touch_updated_at();
CREATE TRIGGER api_keys_touch BEFORE UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION neuronetz_touch_updated_at();

-- Cache invalidation that does not depend on the writer remembering to publish: any change
-- to a key or a tenant, by our CLI, by neuronetz-console or by an operator with psql,
-- notifies every gateway replica, which drops its cached copy (DESIGN.md, Neighbours).
-- The payload names the key prefix or the tenant id; it never carries a secret.
CREATE FUNCTION neuronetz_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    subject text;
BEGIN
    IF TG_OP = 'UPDATE' AND NOT neuronetz_row_changed(to_jsonb(OLD), to_jsonb(NEW)) THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'api_keys' THEN
        subject := 'key:' || CASE WHEN TG_OP = 'DELETE' THEN OLD.prefix ELSE NEW.prefix END;
    ELSE
        subject := 'tenant:' || CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END;
    END IF;
    PERFORM pg_notify('neuronetz_invalidate', subject);
    RETURN NULL;
END $$;

CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION neuronetz_notify_change();
CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION neuronetz_notify_change();
