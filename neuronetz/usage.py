"""Usage for chargeback: the ledger (`usage_daily`) summed over a range of UTC days.

One row per tenant, split further by day, by key and/or by model when asked. Every row has
the same columns, in the order of `COLUMNS`, so scripts read one format whatever the split:

    period_start,period_end,tenant,key_prefix,key_name,model,requests,prompt_tokens,completion_tokens,total_tokens
    2026-11-01,2026-11-30,acme,,,,1200,530000,210000,740000

A row's period is its day when split by day, else the whole range; the key columns are empty
unless split by key, the model column unless split by model. Split by model, '' is usage whose
model the ledger does not know (recorded before it kept models, or a request that named none).
Only tenants, keys, days and models with usage in the range appear.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from neuronetz.tenants import Connection

COLUMNS = (
    "period_start",
    "period_end",
    "tenant",
    "key_prefix",
    "key_name",
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)

# Sums stay `numeric` (never a bigint that could overflow); each split is a flag, so one
# static statement serves every combination.
_EXPORT = """
SELECT CASE WHEN $3 THEN u.day ELSE $1::date END AS period_start,
       CASE WHEN $3 THEN u.day ELSE $2::date END AS period_end,
       t.name AS tenant,
       CASE WHEN $4 THEN k.prefix END AS key_prefix,
       CASE WHEN $4 THEN k.name END AS key_name,
       CASE WHEN $5 THEN u.model END AS model,
       sum(u.requests) AS requests,
       sum(u.prompt_tokens) AS prompt_tokens,
       sum(u.completion_tokens) AS completion_tokens,
       sum(u.prompt_tokens) + sum(u.completion_tokens) AS total_tokens
FROM usage_daily u JOIN tenants t ON t.id = u.tenant_id JOIN api_keys k ON k.id = u.key_id
WHERE u.day BETWEEN $1 AND $2 AND ($6::text IS NULL OR t.name = $6) AND ($7::text IS NULL OR k.prefix = $7)
GROUP BY 1, 2, 3, 4, 5, 6
ORDER BY tenant, period_start, key_prefix, model
"""
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


async def export(
    db: Connection,
    *,
    start: dt.date,
    end: dt.date,
    by_day: bool,
    by_key: bool,
    by_model: bool,
    tenant: str | None = None,
    prefix: str | None = None,
) -> list[dict[str, Any]]:
    """The ledger's requests and tokens from `start` to `end` (UTC days, both included)."""
    rows = await db.fetch(_EXPORT, start, end, by_day, by_key, by_model, tenant, prefix)
    return [{name: int(row[name]) if name in _SUMS else row[name] for name in COLUMNS} for row in rows]
