//! What instances share besides the lanes and the rate: the configured clients' token counts of the
//! day, the keys the upstream refused (by fingerprint, never the key) and the accounts out of balance.
//! The proxy says what it knows (`Facts`); about once a second, and at once when another instance
//! announces a change, the cluster task sends what is new in one script and hands back what the cluster
//! knows, which the proxy follows.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::{millis, Session};

/// How often what is new is sent and the cluster's facts read back.
pub const FACTS_EVERY: Duration = Duration::from_secs(1);
/// How long a day's token counts outlive it.
const TOKENS_KEEP: Duration = Duration::from_secs(2 * 24 * 3600);
/// How long a refused key or a paused account stays the cluster's word after an instance last told it
/// (each tells its own once per connection: then the others try the key or account again, and one that
/// is still refused is told again).
const SETBACK_KEEP: Duration = Duration::from_secs(3600);

/// What this instance knows and the cluster should (from the proxy).
pub trait Facts: Send + Sync {
    /// What is known here now; None once the proxy is gone.
    fn local(&self) -> Option<Local>;
    /// Follows what the cluster knows.
    fn follow(&self, shared: Shared);
}

/// What is known here.
#[derive(Debug, Default)]
pub struct Local {
    /// The ledger's UTC day (days since the epoch), its id, and its totals of the day per client.
    pub utc_day: u64,
    pub ledger: String,
    pub tokens: Vec<(String, u64)>,
    /// Fingerprints of the keys this instance saw refused.
    pub refused: Vec<String>,
    /// Accounts paused here for their balance, and those a balance read resumed since last asked.
    pub paused: Vec<String>,
    pub resumed: Vec<String>,
}

/// What the cluster knows.
#[derive(Debug, Default)]
pub struct Shared {
    pub utc_day: u64,
    /// `Local::tokens`, now in the cluster's counts.
    pub written: Vec<(String, u64)>,
    /// Each client's tokens of the day, all instances together.
    pub tokens: BTreeMap<String, u64>,
    pub refused: HashSet<String>,
    pub paused: HashSet<String>,
    /// `Local::resumed`, now told.
    pub resumed: Vec<String>,
}

/// The task's side, for one connection: what it told the cluster already (a new connection tells it
/// again), and when to share next.
#[derive(Default)]
pub struct FactsTurn {
    refused: HashSet<String>,
    paused: HashSet<String>,
    next: Option<Instant>,
}

impl FactsTurn {
    /// Another instance announced a change: share at once.
    pub fn share_now(&mut self) {
        self.next = None;
    }

    pub fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|at| at <= now)
    }
}

/// FACTS: writes this ledger's totals of the day (a field `client␟ledger` each, never lowered), adds refused keys and
/// paused accounts to their sorted sets (each member lapsing `setback_ms` after it was last added),
/// removes resumed accounts and lapsed members; publishes `facts` when a set changed. Returns {each
/// client's sum over all ledgers (flat), refused fingerprints, paused accounts}.
///
/// KEYS: tokens, refused, paused. ARGV: tokens_keep_ms, setback_ms, channel, ledger, then n and n
/// client/total pairs, n and n fingerprints, n and n paused accounts, n and n resumed accounts.
pub const FACTS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[2])
local i = 5
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  -- A total only grows within its day (a restart from an older state file does not lower it).
  local field = ARGV[i] .. '\31' .. ARGV[4]
  if tonumber(ARGV[i + 1]) > tonumber(redis.call('HGET', KEYS[1], field) or '0') then
    redis.call('HSET', KEYS[1], field, ARGV[i + 1])
  end
  i = i + 2
end
if n > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local changed = 0
for set = 2, 3 do
  n = tonumber(ARGV[i]); i = i + 1
  for _ = 1, n do changed = changed + redis.call('ZADD', KEYS[set], now + keep, ARGV[i]); i = i + 1 end
  if n > 0 then redis.call('PEXPIRE', KEYS[set], keep) end
  changed = changed + redis.call('ZREMRANGEBYSCORE', KEYS[set], '-inf', now)
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do changed = changed + redis.call('ZREM', KEYS[3], ARGV[i]); i = i + 1 end
if changed > 0 then redis.call('PUBLISH', ARGV[3], 'facts') end
local sums = {}
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  local sep = string.find(all[j], '\31', 1, true)
  if sep then
    local client = string.sub(all[j], 1, sep - 1)
    sums[client] = (sums[client] or 0) + tonumber(all[j + 1])
  end
end
local flat = {}
for client, sum in pairs(sums) do
  flat[#flat + 1] = client
  flat[#flat + 1] = sum
end
return {flat, redis.call('ZRANGE', KEYS[2], 0, -1), redis.call('ZRANGE', KEYS[3], 0, -1)}
"#;

impl Session<'_> {
    /// Sends what is new here and follows what the cluster knows.
    pub(super) async fn share_facts(&mut self, turn: &mut FactsTurn) -> Result<(), redis::RedisError> {
        turn.next = Some(Instant::now() + FACTS_EVERY);
        let Some(local) = self.facts.local() else { return Ok(()) };
        // What is no longer so here (a reload's fresh accounts) is told again should it happen again.
        turn.refused.retain(|f| local.refused.contains(f));
        turn.paused.retain(|a| local.paused.contains(a));
        let refused: Vec<&String> = local.refused.iter().filter(|f| !turn.refused.contains(*f)).collect();
        let paused: Vec<&String> = local.paused.iter().filter(|a| !turn.paused.contains(*a)).collect();
        let prefix = &self.settings.prefix;
        let mut invocation = self.scripts.facts.key(format!("{prefix}:tokens:{}", local.utc_day));
        invocation.key(format!("{prefix}:keys:refused")).key(format!("{prefix}:accounts:paused"));
        invocation.arg(millis(TOKENS_KEEP)).arg(millis(SETBACK_KEEP)).arg(self.settings.channel());
        invocation.arg(&local.ledger).arg(local.tokens.len());
        for (client, tokens) in &local.tokens {
            invocation.arg(client).arg(tokens);
        }
        for list in [&refused, &paused, &local.resumed.iter().collect()] {
            invocation.arg(list.len());
            for item in list {
                invocation.arg(*item);
            }
        }
        self.count();
        let (tokens, shared_refused, shared_paused): (BTreeMap<String, u64>, HashSet<String>, HashSet<String>) =
            invocation.invoke_async(&mut self.connection).await?;
        turn.refused.extend(refused.into_iter().cloned());
        turn.paused.extend(paused.into_iter().cloned());
        for resumed in &local.resumed {
            turn.paused.remove(resumed);
        }
        self.facts.follow(Shared {
            utc_day: local.utc_day,
            written: local.tokens,
            tokens,
            refused: shared_refused,
            paused: shared_paused,
            resumed: local.resumed,
        });
        Ok(())
    }
}
