-- How far each gateway worker's usage ledger got, in the numbering of its crash journal
-- (journal.py): when a worker dies, another one replays the journal entries past this point
-- and no further, so usage the dead worker had already written is not counted twice. A row
-- lives as long as its worker; the replay deletes it.

CREATE TABLE journal_progress (
    worker      text PRIMARY KEY,
    seq         bigint NOT NULL CHECK (seq >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
