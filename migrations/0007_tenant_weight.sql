-- Fair sharing: a tenant's weight in the gateway's queue for backend slots. A backlogged tenant
-- gets slots in proportion to its weight; 1 for every existing tenant.
ALTER TABLE tenants ADD COLUMN weight integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000);
