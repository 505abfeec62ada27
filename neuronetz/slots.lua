-- Backend slots and the fair queue of one model, shared by every replica: one round trip to
-- acquire (join the queue, and get a slot at once when the fair order allows), one to release
-- (which hands the freed slot to the next waiter). The clock is Redis TIME.
--
-- KEYS[1] = the model's base key; every key below is KEYS[1] .. suffix and shares its hash tag
--           (one Redis Cluster slot per model)
-- ARGV[1] = "acquire" | "release" | "renew", ARGV[2] = the pub/sub channel for grants
--
-- State (suffixes):
--   tq        zset tenant -> virtual start tag of its next service (tenants with waiters)
--   kq:<t>    zset key -> tag of its next service within tenant t (keys with waiters)
--   q:<k>     list of the key's waiter ids, FIFO
--   v         hash: "V" the virtual clock; "t:<t>" / "k:<k>" a tenant's / key's tag after its
--             last service; "kV:<t>" tenant t's own clock among its keys; "w:<t>" its weight
--   w         zset waiter -> expiry (ms): waiters whose replica stopped polling are skipped
--   n         hash tenant -> waiters (the queue depth per tenant)
--   s:<url>   zset lease -> expiry (ms): the slots in use on one backend
--   g:<id>    string: the backend granted to a waiter by someone else's release, until taken
--
-- Order (start-time fair queueing): the tenant with the smallest tag is served next and its
-- tag grows by 1/weight, so backlogged tenants get slots in proportion to their weights; a
-- tenant that becomes backlogged starts at max(V, its old tag), so idling earns no credit and
-- an idle tenant's share goes to the others. Within a tenant its keys take turns the same way
-- (weight 1 each); within a key, FIFO.
--
-- Candidates (acquire, release): ARGV triples (backend url, slots, class): slots 0 is
-- unbounded; a lower class is preferred (0: the model is loaded there, 1: cold), then the most
-- free slots.
--
-- acquire: ARGV[3] waiter, [4] tenant, [5] key, [6] weight, [7] waiter ttl ms, [8] lease ttl
--          ms, [9] max depth per tenant, [10...] candidates
--          -> {1, backend} a slot is held; {2, depth} waiting; {0, "queue_full"}
-- release: ARGV[3] waiter, [4] tenant, [5] key, [6] backend or "" (then any candidate's),
--          [7] lease ttl ms, [8...] candidates. Leaves the queue, drops a grant and the slot. -> {1}
-- renew:   ARGV[3] lease ttl ms, [4...] pairs (waiter, backend) -> {renewed count}

local base = KEYS[1]
local action, channel = ARGV[1], ARGV[2]
local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local STATE_TTL = 86400000

local function num(value)
    return tonumber(value) or 0
end

local function candidates(from)
    local list = {}
    for i = from, #ARGV, 3 do
        list[#list + 1] = {ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])}
    end
    return list
end

-- The backend with a free slot, best first; nil when all are full.
local function free_backend(cands)
    local best, best_class, best_free
    for _, c in ipairs(cands) do
        local free
        if c[2] == 0 then
            free = 1e9
        else
            redis.call("ZREMRANGEBYSCORE", base .. "s:" .. c[1], "-inf", now)
            free = c[2] - redis.call("ZCARD", base .. "s:" .. c[1])
        end
        if free > 0 and (best == nil or c[3] < best_class or (c[3] == best_class and free > best_free)) then
            best, best_class, best_free = c[1], c[3], free
        end
    end
    return best
end

-- Take a key out of its tenant's rotation (and the tenant out of the queue) once it is empty.
local function settle_empty(t, k, ktag, ttag)
    if redis.call("LLEN", base .. "q:" .. k) == 0 then
        redis.call("ZREM", base .. "kq:" .. t, k)
        redis.call("HSET", base .. "v", "k:" .. k, ktag)
    end
    if redis.call("ZCARD", base .. "kq:" .. t) == 0 then
        redis.call("ZREM", base .. "tq", t)
        redis.call("HSET", base .. "v", "t:" .. t, ttag)
        return true
    end
    return false
end

-- The next live waiter in fair order, removed from the queue; nil when nobody waits.
local function next_waiter()
    while true do
        local top = redis.call("ZRANGE", base .. "tq", 0, 0, "WITHSCORES")
        if #top == 0 then
            return nil
        end
        local t, tag = top[1], tonumber(top[2])
        local ktop = redis.call("ZRANGE", base .. "kq:" .. t, 0, 0, "WITHSCORES")
        if #ktop == 0 then
            redis.call("ZREM", base .. "tq", t) -- a tenant without keys in line (cannot stay so)
        else
            local k, ktag = ktop[1], tonumber(ktop[2])
            local w = redis.call("LPOP", base .. "q:" .. k)
            local expiry = w and redis.call("ZSCORE", base .. "w", w)
            if w then
                redis.call("ZREM", base .. "w", w)
                redis.call("HINCRBY", base .. "n", t, -1)
            end
            if expiry and tonumber(expiry) > now then
                local weight = math.max(num(redis.call("HGET", base .. "v", "w:" .. t)), 1)
                redis.call("HSET", base .. "v", "V", tag, "kV:" .. t, ktag)
                if not settle_empty(t, k, ktag + 1, tag + 1 / weight) then
                    if redis.call("LLEN", base .. "q:" .. k) > 0 then
                        redis.call("ZADD", base .. "kq:" .. t, ktag + 1, k)
                    end
                    redis.call("ZADD", base .. "tq", tag + 1 / weight, t)
                end
                return w
            end
            settle_empty(t, k, ktag, tag) -- a dead waiter: skipped, charged nothing
        end
    end
end

-- Hand free slots to waiters in fair order; publish each grant except `own`'s, which is returned.
local function dispatch(cands, lease_ttl, own)
    local mine
    while true do
        local backend = free_backend(cands)
        if backend == nil then
            break
        end
        local w = next_waiter()
        if w == nil then
            break
        end
        redis.call("ZADD", base .. "s:" .. backend, now + lease_ttl, w)
        redis.call("PEXPIRE", base .. "s:" .. backend, STATE_TTL)
        if w == own then
            mine = backend
        else
            redis.call("SET", base .. "g:" .. w, backend, "PX", lease_ttl)
            redis.call("PUBLISH", channel, w .. " " .. backend)
        end
    end
    return mine
end

if action == "acquire" then
    local w, t, k, weight = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
    local waiter_ttl, lease_ttl, max_depth = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
    local granted = redis.call("GET", base .. "g:" .. w)
    if granted then -- someone's release chose this waiter while its replica was not listening
        redis.call("DEL", base .. "g:" .. w)
        return {1, granted}
    end
    if redis.call("ZSCORE", base .. "w", w) then
        redis.call("ZADD", base .. "w", "XX", now + waiter_ttl, w)
    else
        if num(redis.call("HGET", base .. "n", t)) >= max_depth then
            return {0, "queue_full"}
        end
        local v = base .. "v"
        redis.call("HSET", v, "w:" .. t, weight)
        if not redis.call("ZSCORE", base .. "tq", t) then
            redis.call("ZADD", base .. "tq", math.max(num(redis.call("HGET", v, "V")), num(redis.call("HGET", v, "t:" .. t))), t)
        end
        if not redis.call("ZSCORE", base .. "kq:" .. t, k) then
            local start = math.max(num(redis.call("HGET", v, "kV:" .. t)), num(redis.call("HGET", v, "k:" .. k)))
            redis.call("ZADD", base .. "kq:" .. t, start, k)
        end
        redis.call("RPUSH", base .. "q:" .. k, w)
        redis.call("ZADD", base .. "w", now + waiter_ttl, w)
        redis.call("HINCRBY", base .. "n", t, 1)
        for _, suffix in ipairs({"v", "tq", "kq:" .. t, "q:" .. k, "w", "n"}) do
            redis.call("PEXPIRE", base .. suffix, STATE_TTL)
        end
    end
    local mine = dispatch(candidates(10), lease_ttl, w)
    if mine then
        return {1, mine}
    end
    return {2, num(redis.call("HGET", base .. "n", t))}
end

if action == "release" then
    local w, t, k, backend, lease_ttl = ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
    if redis.call("ZREM", base .. "w", w) == 1 then
        redis.call("LREM", base .. "q:" .. k, 1, w)
        redis.call("HINCRBY", base .. "n", t, -1)
        local ktag = redis.call("ZSCORE", base .. "kq:" .. t, k)
        local ttag = redis.call("ZSCORE", base .. "tq", t)
        if ktag and ttag then
            settle_empty(t, k, tonumber(ktag), tonumber(ttag))
        end
    end
    local granted = redis.call("GET", base .. "g:" .. w)
    if granted then
        redis.call("DEL", base .. "g:" .. w)
        redis.call("ZREM", base .. "s:" .. granted, w)
    end
    local cands = candidates(8)
    if backend ~= "" then
        redis.call("ZREM", base .. "s:" .. backend, w)
    else -- a waiter that left may have been given a slot by a reply it never read
        for _, c in ipairs(cands) do
            redis.call("ZREM", base .. "s:" .. c[1], w)
        end
    end
    dispatch(cands, lease_ttl, nil)
    return {1}
end

if action == "renew" then
    local lease_ttl = tonumber(ARGV[3])
    local renewed = 0
    for i = 4, #ARGV, 2 do
        renewed = renewed + redis.call("ZADD", base .. "s:" .. ARGV[i + 1], "XX", "CH", now + lease_ttl, ARGV[i])
    end
    return {renewed}
end

return redis.error_reply("unknown action " .. tostring(action))
