-- Key rotation. `rotate-key` gives a key a successor with the same tenant, name, limits, models
-- and prompt settings; the old key keeps working until a grace period ends (its expires_at) and
-- names its successor here. The successor is inserted after the old key points to it, in the
-- same transaction, hence the deferred check.
ALTER TABLE api_keys ADD COLUMN replaced_by text UNIQUE
    REFERENCES api_keys (prefix) DEFERRABLE INITIALLY DEFERRED;

-- A name is unique among a tenant's current keys only: a replaced key shares its name with
-- its successor (and a successor cannot be deleted while a key still names it).
ALTER TABLE api_keys DROP CONSTRAINT api_keys_tenant_id_name_key;
CREATE UNIQUE INDEX api_keys_current_name ON api_keys (tenant_id, name) WHERE replaced_by IS NULL;
