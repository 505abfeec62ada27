-- Fair sharing: how long the request waited in the gateway's queue for a backend slot, in
-- milliseconds (0 when a slot was free at once). NULL: the request did not go through the
-- queue (its backend has no slots configured, or it never reached a backend).
ALTER TABLE request_log ADD COLUMN queue_wait_ms real;
