-- Admission and settlement of requests against every limit of their key and tenant: one round
-- trip to admit, and settlements that ride along with it. All keys carry the tenant's hash tag,
-- so the script also runs on Redis Cluster. The clock is Redis TIME, shared by every replica.
--
-- ARGV[1] = "admit" | "settle" | "renew" | "instance" | "rebuild"
-- admit, settle: ARGV[2] = lease ttl (ms): an in-flight request's lease expires unless renewed
--         ARGV[3] = n, the number of settlements this call carries, then 3 arguments for each:
--         lease id, tokens reserved at admission (as admit returned it), tokens actually used
--         (of requests of the same key that ended: settled before anything else, so a
--         request that ended gives its slot back before the admission it rides with is counted)
-- admit:  then 5 more: lease id (unique per request), prompt estimate (tokens), requested
--         output cap (-1: none), default output cap, minimum output worth admitting
-- then the checks (below).
-- renew:  KEYS = lease zsets holding the lease; ARGV[2] = lease ttl, ARGV[3] = lease id;
--         extends it by the lease ttl
-- instance: KEYS[1] = this Redis's instance marker (Redis TIME in ms when a gateway first saw
--         this Redis's data); created if missing. Returns {ms since then}: 0 means it was just
--         created, so this Redis holds none of the counters it had before (a restart, a flush).
-- rebuild: KEYS[1] = epoch marker, KEYS[2...] = used-tokens counters; ARGV[2] = new epoch,
--         ARGV[3...] = (tokens, ttl_s) per counter. Adds the ledger's sums and sets the epoch,
--         all or nothing, unless another replica finished the rebuild first.
-- The checks; each names its kind and consumes its KEYS in order:
--   "E"                       KEYS: epoch marker (budget counters are valid only while it exists)
--   "R", label, rpm           KEYS: GCRA theoretical arrival time (ms) for requests
--   "T", label, tpm           KEYS: GCRA theoretical arrival time (ms) for tokens
--   "L", label, max_conc      KEYS: lease zset (member lease id, score expiry ms), amount hash
--                             (lease id -> tokens reserved, and their sum under "="); max_conc 0
--                             means no concurrency limit
--   "B", label, limit, ttl_s  KEYS: used-tokens counter of one budget period; its reservations
--                             are those of the "L" check before it (same scope). limit -1: no
--                             budget for this period, the counter only counts (so a budget added
--                             later starts from the spend so far). ttl_s: the counter's expiry,
--                             set when a charge creates it (0: none)
-- KEYS and the checks are the same in every call for one key on one UTC day, and come first and
-- last: the gateway encodes them once and only the arguments between them per call (limits.py,
-- `Checks`).
--
-- admit returns {1, cap, reservation, req_limit, req_remaining, req_reset_ms,
--                tok_limit, tok_remaining, tok_reset_ms}   (-1 where no such limit applies)
--            or {0, reason, retry_after_ms, label}   (its settlements are made either way)
--   reason: "rebuild" | "rpm" | "tpm" | "tpm_too_large" | "concurrency" | "budget_spent" | "budget_reserved"
-- settle and renew return {1}; rebuild returns {1} when it wrote, {0} when it was already done

local PERIOD = 60000 -- rate limits are per minute; a whole minute's worth may burst

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = ARGV[1]

if mode == 'instance' then
    redis.call('SET', KEYS[1], now, 'NX')
    return {now - tonumber(redis.call('GET', KEYS[1]))}
end

local lease_ttl = tonumber(ARGV[2])

if mode == 'renew' then
    for _, key in ipairs(KEYS) do
        redis.call('ZADD', key, 'XX', now + lease_ttl, ARGV[3])
        redis.call('PEXPIRE', key, lease_ttl * 2)
    end
    return {1}
end

if mode == 'rebuild' then
    if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
    for i = 2, #KEYS do
        local tokens, ttl = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
        if tokens > 0 then redis.call('INCRBY', KEYS[i], tokens) end
        if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    end
    redis.call('SET', KEYS[1], ARGV[2])
    return {1}
end

-- Read all checks into a list first: phase 1 of admit evaluates, phase 2 writes. Each lease
-- check also lists the budget checks that follow it (same scope): its reservations count
-- against those.
local settlements = tonumber(ARGV[3])
local first = 4 + 3 * settlements -- the admission's own arguments, or the checks
local checks, k, a, current = {}, 1, first + ((mode == 'admit') and 5 or 0), nil
while ARGV[a] do
    -- (each check's table is built whole: a table grown field by field is rehashed each time)
    local kind, c = ARGV[a], nil
    if kind == 'E' then
        c = {kind = kind, key = KEYS[k], value = false}
        k = k + 1; a = a + 1
    elseif kind == 'R' or kind == 'T' then
        c = {kind = kind, label = ARGV[a + 1], limit = tonumber(ARGV[a + 2]), key = KEYS[k], value = false}
        k = k + 1; a = a + 3
    elseif kind == 'L' then
        c = {kind = kind, label = ARGV[a + 1], limit = tonumber(ARGV[a + 2]), key = KEYS[k], amounts = KEYS[k + 1],
             budgets = {}, reserved = 0}
        k = k + 2; a = a + 3
        current = c
    else -- 'B'
        c = {kind = kind, label = ARGV[a + 1], limit = tonumber(ARGV[a + 2]), ttl = tonumber(ARGV[a + 3]),
             key = KEYS[k], value = false}
        k = k + 1; a = a + 4
        if current then current.budgets[#current.budgets + 1] = c end
    end
    checks[#checks + 1] = c
end

-- Every counter a mode reads, read at once: one MGET instead of a GET per check (each
-- redis.call costs about as much again as the command itself). c.value: false when missing.
local function read(wanted)
    local readable = {}
    for _, c in ipairs(checks) do
        if wanted(c) then readable[#readable + 1] = c end
    end
    if #readable == 0 then return end
    local keys = {}
    for i, c in ipairs(readable) do keys[i] = c.key end
    local values = redis.call('MGET', unpack(keys))
    for i, c in ipairs(readable) do c.value = values[i] end
end

-- A budget counter is given its expiry when it is created (the increment is all it holds), not
-- on every charge. The new count is kept for the checks that follow.
local function charge(budget, amount)
    budget.value = redis.call('INCRBY', budget.key, amount)
    if budget.value == amount and budget.ttl > 0 then
        redis.call('EXPIRE', budget.key, budget.ttl)
    end
end

-- Leases of crashed holders expire: their reservation is charged in full to the budget
-- counters of the same scope (never undercharge), then forgotten.
-- A lease's reservation leaves the scope's running sum ("=", kept so that admission reads one
-- field instead of adding up every request in flight).
local function release(lease_check, member)
    local amount = tonumber(redis.call('HGET', lease_check.amounts, member) or '0')
    if amount > 0 then
        redis.call('HINCRBY', lease_check.amounts, '=', -amount)
        redis.call('HDEL', lease_check.amounts, member)
    end
    return amount
end

local function reap(lease_check)
    local expired = redis.call('ZRANGEBYSCORE', lease_check.key, '-inf', now)
    for _, member in ipairs(expired) do
        local amount = release(lease_check, member)
        if amount > 0 then
            for _, b in ipairs(lease_check.budgets) do charge(b, amount) end
        end
    end
    if #expired > 0 then redis.call('ZREMRANGEBYSCORE', lease_check.key, '-inf', now) end
end

local function reserved(lease_check)
    return tonumber(redis.call('HGET', lease_check.amounts, '=') or '0')
end

-- The settlements this call carries: each frees its request's slot and reservation, gives back
-- the tokens per minute it reserved but did not use (or charges an overrun), and charges what it
-- used to the budget counters. Needs the "T" checks' values read.
local function settle()
    if settlements == 0 then return end
    local leases, used = {}, 0
    for i = 1, settlements do
        leases[i] = ARGV[1 + 3 * i]
        used = used + tonumber(ARGV[3 + 3 * i])
    end
    for _, c in ipairs(checks) do
        if c.kind == 'T' then
            -- Move the theoretical arrival time by each refund, never into the past.
            local tat = tonumber(c.value or now)
            local moved = tat
            for i = 1, settlements do
                local refund = tonumber(ARGV[2 + 3 * i]) - tonumber(ARGV[3 + 3 * i])
                if refund ~= 0 then moved = math.max(now, moved - refund * PERIOD / c.limit) end
            end
            if moved ~= tat then
                redis.call('SET', c.key, moved, 'PX', math.max(1, math.ceil(moved - now) + PERIOD))
                c.value = moved
            end
        elseif c.kind == 'L' then
            redis.call('ZREM', c.key, unpack(leases))
            -- The reservation is the one the lease made, unless the lease expired and was
            -- reaped: then its entry is gone and the sum no longer holds it.
            local freed = 0
            for i = 1, settlements do
                local amount = tonumber(ARGV[2 + 3 * i])
                if amount > 0 and redis.call('HDEL', c.amounts, leases[i]) == 1 then freed = freed + amount end
            end
            if freed > 0 then redis.call('HINCRBY', c.amounts, '=', -freed) end
        elseif c.kind == 'B' and used > 0 then
            charge(c, used)
        end
    end
end

if mode == 'settle' then
    read(function(c) return c.kind == 'T' end)
    settle()
    return {1}
end

-- admit, phase 1: evaluate every check, write nothing.
local lease, prompt, requested, default_cap, min_output =
    ARGV[first], tonumber(ARGV[first + 1]), tonumber(ARGV[first + 2]), tonumber(ARGV[first + 3]),
    tonumber(ARGV[first + 4])
-- room: the fewest tokens any token limit (TPM or budget) allows right now, and which one
local room, room_label, room_reason, room_limit = nil, nil, nil, 0
current = nil
read(function(c) return c.kind ~= 'L' and not (c.kind == 'B' and c.limit < 0) end)
settle()
for _, c in ipairs(checks) do
    if c.kind == 'E' then
        if not c.value then return {0, 'rebuild', 1000, ''} end
    elseif c.kind == 'L' then
        reap(c)
        c.reserved = reserved(c)
        current = c
        if c.limit > 0 and redis.call('ZCARD', c.key) >= c.limit then
            local first = redis.call('ZRANGE', c.key, 0, 0, 'WITHSCORES')
            return {0, 'concurrency', math.min(1000, math.max(1, tonumber(first[2]) - now)), c.label}
        end
    elseif c.kind == 'B' and c.limit >= 0 then
        local used = tonumber(c.value or '0')
        local spent_room = c.limit - used
        local free = spent_room - (current and current.reserved or 0)
        if room == nil or free < room then
            room, room_label = free, c.label
            -- Spent means only time (the next period) helps; reserved means requests in flight
            -- hold it and will give most of it back when they settle.
            room_reason = (spent_room < prompt + min_output) and 'budget_spent' or 'budget_reserved'
        end
    elseif c.kind == 'T' then
        local tat = math.max(tonumber(c.value or now), now)
        local free = math.floor((now + PERIOD - tat) * c.limit / PERIOD)
        if room == nil or free < room then room, room_label, room_reason, room_limit = free, c.label, 'tpm', c.limit end
    end
end

local cap, reservation = requested, 0
if room ~= nil then
    local allowance = room - prompt
    -- A client's own cap is kept when it fits and shortened to what fits otherwise; without
    -- one, the default cap applies, again no more than what fits.
    local needed = min_output
    if requested >= 0 then
        cap = math.min(requested, allowance)
        needed = math.min(requested, min_output) -- 0 for embeddings, which produce no tokens
    else
        cap = math.min(default_cap, allowance)
    end
    if cap < needed then
        local retry = 1000
        if room_reason == 'tpm' then
            if prompt + needed > room_limit then return {0, 'tpm_too_large', 0, room_label} end
            retry = math.ceil((prompt + needed - room) * PERIOD / room_limit)
        end
        return {0, room_reason, retry, room_label}
    end
    reservation = prompt + cap
end

local req_limit, req_remaining, req_reset = -1, -1, -1
local tok_limit, tok_remaining, tok_reset = -1, -1, -1
local writes = {}
for _, c in ipairs(checks) do
    if c.kind == 'R' or c.kind == 'T' then
        local cost = (c.kind == 'R') and 1 or reservation
        local interval = PERIOD / c.limit
        local tat = math.max(tonumber(c.value or now), now)
        local new_tat = tat + cost * interval
        if new_tat - now > PERIOD then
            return {0, (c.kind == 'R') and 'rpm' or 'tpm', math.ceil(new_tat - now - PERIOD), c.label}
        end
        writes[#writes + 1] = {c.key, new_tat}
        local remaining = math.floor((now + PERIOD - new_tat) / interval)
        local reset = math.ceil(new_tat - now)
        if c.kind == 'R' and (req_remaining < 0 or remaining < req_remaining) then
            req_limit, req_remaining, req_reset = c.limit, remaining, reset
        elseif c.kind == 'T' and (tok_remaining < 0 or remaining < tok_remaining) then
            tok_limit, tok_remaining, tok_reset = c.limit, remaining, reset
        end
    end
end

-- phase 2: everything passed; commit it all. (Numbers used more than once are turned into
-- text once: each redis.call argument that is a number is formatted again.)
for _, w in ipairs(writes) do
    redis.call('SET', w[1], w[2], 'PX', math.ceil(w[2] - now) + PERIOD)
end
local expires, keep, reserve = tostring(now + lease_ttl), tostring(lease_ttl * 2), tostring(reservation)
for _, c in ipairs(checks) do
    if c.kind == 'L' then
        redis.call('ZADD', c.key, expires, lease)
        redis.call('PEXPIRE', c.key, keep)
        if reservation > 0 then
            redis.call('HSET', c.amounts, lease, reserve)
            redis.call('HINCRBY', c.amounts, '=', reserve)
            redis.call('PEXPIRE', c.amounts, keep)
        end
    end
end
return {1, cap, reservation, req_limit, req_remaining, req_reset, tok_limit, tok_remaining, tok_reset}
