-- The usage ledger learns the model: a row is now per key, UTC day and model, so usage can be
-- exported per model (`usage --from … --by model`). Budgets stay per key and tenant: every
-- reader of the ledger that is about budgets sums over the models.
--
-- `model` is the name as the gateway compares names (lower case, `:latest` added when it has
-- no tag; at most 256 characters and no control characters, checked before a request is
-- forwarded). '' means the model is not known: rows written before this migration, and
-- requests whose body named no model.
--
-- The key becomes (key_id, day, model): the gateway adds to its rows with
-- INSERT … ON CONFLICT (key_id, day, model). Dropping the old key and adding the new one in
-- the same transaction keeps existing rows as they are, each with model ''.

ALTER TABLE usage_daily ADD COLUMN model text NOT NULL DEFAULT '';
ALTER TABLE usage_daily DROP CONSTRAINT usage_daily_pkey;
ALTER TABLE usage_daily ADD PRIMARY KEY (key_id, day, model);
