//! The Lua scripts that keep a lane's shared state in Redis — each runs atomically, on Redis's clock.
//! A lane's keys: `…:state` (hash: `limit`, `probe_at`, `gap`, `streak`, `throttles`, `acks`, `last_dec`),
//! `…:held` (hash: instance → slots leased), `…:expiry` (sorted set: instance → when its leases and
//! wishes lapse) and `…:wanted` (hash: instance → slots it would use now).

use redis::Script;

/// CLAIM: this instance wants `desired` slots of the lane (never fewer than `floor`, its requests in
/// flight). Lapsed instances' leases come back first. Grants up to the lane's learned limit minus what
/// the others hold, and no more than its fair share while others want slots too (max-min: an equal share
/// of the limit, plus what instances wanting less leave over) — so a busy instance cannot keep the whole
/// limit from another. While the lane probes, nothing new but one probe at a time, cluster-wide, once its
/// gap has passed. What is in flight stays leased even past the limit or the share, but only `granted`
/// may serve new dispatches (an instance over it drains down to it). Returns {held by this instance,
/// limit, held by all, probing (0/1), granted}.
///
/// KEYS: state, held, expiry, wanted. ARGV: instance, desired, floor, cap, initial, ttl_ms, keep_ms, channel.
pub const CLAIM: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local instance, desired, floor = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, initial, ttl, keep = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('HDEL', KEYS[2], gone)
  redis.call('HDEL', KEYS[4], gone)
  redis.call('ZREM', KEYS[3], gone)
end
if desired > 0 then redis.call('HSET', KEYS[4], instance, desired) else redis.call('HDEL', KEYS[4], instance) end
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit') or '0')
if limit == 0 or limit > cap then
  limit = limit == 0 and math.min(cap, initial) or cap
  redis.call('HSET', KEYS[1], 'limit', limit)
end
local mine = tonumber(redis.call('HGET', KEYS[2], instance) or '0')
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do total = total + tonumber(v) end
local others = total - mine
local room = limit - others
local probe_at = tonumber(redis.call('HGET', KEYS[1], 'probe_at') or '0')
if probe_at > 0 then
  room = 0
  if now >= probe_at and total == 0 and desired > 0 then
    room = 1
    local gap = tonumber(redis.call('HGET', KEYS[1], 'gap') or '1000')
    redis.call('HSET', KEYS[1], 'probe_at', now + gap)
  end
end
local wishes = redis.call('HGETALL', KEYS[4])
local active = 0
for i = 2, #wishes, 2 do if tonumber(wishes[i]) > 0 then active = active + 1 end end
local share = math.ceil(limit / math.max(active, 1))
local others_use = 0
for i = 1, #wishes, 2 do
  if wishes[i] ~= instance then others_use = others_use + math.min(tonumber(wishes[i + 1]), share) end
end
local fair = math.max(share, limit - others_use)
local granted = math.min(desired, math.max(room, 0), fair)
local held = math.max(floor, granted)
if held > 0 then redis.call('HSET', KEYS[2], instance, held) else redis.call('HDEL', KEYS[2], instance) end
if held > 0 or desired > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, instance)
else
  redis.call('ZREM', KEYS[3], instance)
end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], keep) end
if held < mine then redis.call('PUBLISH', ARGV[8], 'released') end
local probing = 0
if probe_at > 0 then probing = 1 end
return {held, limit, others + held, probing, granted}
"#;

/// SIGNAL: what attempts on the lane came to, `accepted` of them taken and `throttled` refused (429,
/// 503 overloaded; `retry_ms` the longest Retry-After). Each throttle lowers the learned limit by one
/// below what all instances hold (a wave of n 429s over a limit that was n too high converges in one
/// step, as a single instance's lane does); a throttled probe lowers nothing (the probing gate handles
/// it). The level before a wave (200 ms) is the ceiling. Three in a row, a Retry-After, or the floor
/// reached start probing with a gap doubling from `base_ms` to `max_ms`.
/// Acceptances end probing; at the limit they raise it — by one each before the first throttle (slow
/// start), by one a second after, and only every ten seconds at and past the level that was throttled
/// last (the ceiling). Returns the limit.
///
/// KEYS: state, held. ARGV: accepted, throttled, retry_ms, min, cap, base_ms, max_ms, keep_ms, channel.
pub const SIGNAL: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local accepted, throttled, retry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local min, cap, base, max, keep = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local limit = tonumber(redis.call('HGET', KEYS[1], 'limit') or tostring(cap))
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do total = total + tonumber(v) end
local changed = false
if throttled > 0 then
  if redis.call('HEXISTS', KEYS[1], 'probe_at') == 0 then
    local last = tonumber(redis.call('HGET', KEYS[1], 'last_dec') or '0')
    if now - last >= 200 then redis.call('HSET', KEYS[1], 'ceiling', limit) end
    limit = math.max(min, math.min(limit, total) - throttled)
    redis.call('HSET', KEYS[1], 'limit', limit, 'last_dec', now, 'acks', 0)
    redis.call('HINCRBY', KEYS[1], 'throttles', 1)
  end
  local streak = redis.call('HINCRBY', KEYS[1], 'streak', throttled)
  if streak >= 3 or retry > 0 or limit <= min then
    local gap = tonumber(redis.call('HGET', KEYS[1], 'gap') or '0')
    if gap == 0 then gap = base else gap = math.min(max, gap * 2) end
    redis.call('HSET', KEYS[1], 'gap', gap, 'probe_at', now + math.max(gap, math.min(retry, max)))
  end
  changed = true
elseif accepted > 0 then
  redis.call('HSET', KEYS[1], 'streak', 0)
  if redis.call('HEXISTS', KEYS[1], 'probe_at') == 1 then
    redis.call('HDEL', KEYS[1], 'probe_at', 'gap')
    changed = true
  elseif total >= limit and limit < cap then
    if tonumber(redis.call('HGET', KEYS[1], 'throttles') or '0') == 0 then
      limit = math.min(cap, limit + accepted)
      redis.call('HSET', KEYS[1], 'limit', limit)
      changed = true
    else
      local ceiling = tonumber(redis.call('HGET', KEYS[1], 'ceiling') or '0')
      local calm = 1000
      if limit + 1 >= ceiling then calm = 10000 end
      if now - tonumber(redis.call('HGET', KEYS[1], 'last_inc') or '0') >= calm
          and now - tonumber(redis.call('HGET', KEYS[1], 'last_dec') or '0') >= calm then
        limit = limit + 1
        redis.call('HSET', KEYS[1], 'limit', limit, 'last_inc', now)
        changed = true
      end
    end
  end
end
redis.call('PEXPIRE', KEYS[1], keep)
if changed then redis.call('PUBLISH', ARGV[9], 'changed') end
return limit
"#;

/// MEMBER: this instance is alive until `ttl_ms` from now; returns how many instances are.
///
/// KEYS: members. ARGV: instance, ttl_ms, keep_ms.
pub const MEMBER: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return redis.call('ZCARD', KEYS[1])
"#;

/// RATE: the cluster's GCRA for `limits.rate` (one theoretical arrival time, in microseconds of Redis's
/// clock), at this instance's emission interval: reserves up to `wanted` tokens that conform within
/// `horizon_us` from now (the burst allowing). Returns {tokens reserved, microseconds from now until the
/// first of them conforms (negative: it already did; the others follow one interval apart),
/// microseconds until another could be reserved}.
///
/// KEYS: tat. ARGV: interval_us, burst, wanted, horizon_us.
pub const RATE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = math.max(1, tonumber(ARGV[1])), math.max(1, tonumber(ARGV[2]))
local wanted, horizon = tonumber(ARGV[3]), math.max(0, tonumber(ARGV[4]))
local tolerance = (burst - 1) * interval
-- No caller owes more than a burst, a horizon and an interval ahead (a slower rate's debt, after a
-- reload to a faster one, does not hold the new rate back).
local stored = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
local tat = math.min(stored, now + tolerance + horizon + interval)
local first = tat - tolerance - now
local free = math.floor((horizon - first) / interval) + 1
local taken = math.max(0, math.min(wanted, free))
tat = tat + taken * interval
if taken > 0 or tat < stored then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
end
return {taken, first, math.max(0, tat - tolerance - now - horizon)}
"#;

/// The scripts, loaded once (redis-rs sends EVALSHA, and the source when Redis does not know it yet).
pub struct Scripts {
    pub claim: Script,
    pub signal: Script,
    pub member: Script,
    pub rate: Script,
    pub facts: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            claim: Script::new(CLAIM),
            signal: Script::new(SIGNAL),
            member: Script::new(MEMBER),
            rate: Script::new(RATE),
            facts: Script::new(super::facts::FACTS),
        }
    }
}
