//! Each configured client's tokens of the UTC day (prompt + completion, from responses' usage), against its
//! `daily_tokens`. Kept in `<state_dir>/client-tokens.json` — written atomically (a temporary file renamed
//! over it) at most every `SAVE_EVERY` and at shutdown, read back at start when it is of the same day — so
//! a restart does not hand out a fresh quota. The day is the wall clock's at start plus tokio's monotonic
//! time since (so tests can move it), re-anchored whenever the wall clock runs ahead of that (a suspend,
//! a clock step).
//!
//! In a cluster, each client's count is the cluster's: about once a second this instance writes its own
//! totals of the day to Redis under its ledger id (`cluster/facts.rs`; writing a total again is
//! harmless, and a Redis that lost them gets them back), and a check reads the cluster's sum plus what
//! was charged here since. The ledger id is kept in the state file, so a restart with the same state
//! directory overwrites its own totals instead of counting them twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::ProxyError;

/// The most often the ledger is written.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);
const FILE: &str = "client-tokens.json";
const DAY: u64 = 86_400;

/// Tokens per client name, for one UTC day.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Day {
    /// Days since the Unix epoch (UTC).
    utc_day: u64,
    tokens: BTreeMap<String, u64>,
    /// This ledger's name in a cluster's counts (kept across days and restarts).
    #[serde(default)]
    id: String,
    /// Of `tokens`, what the cluster's counts hold, as last written.
    #[serde(skip)]
    written: BTreeMap<String, u64>,
    /// The cluster's counts of the day, as last read (None: not in a cluster, or not read yet today).
    #[serde(skip)]
    cluster: Option<BTreeMap<String, u64>>,
}

impl Day {
    fn new(utc_day: u64, id: String) -> Self {
        Self { utc_day, id, ..Self::default() }
    }
}

/// A fresh ledger id: random, 16 hex digits.
fn new_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

pub struct Ledger {
    day: Mutex<(Day, bool)>,
    path: Option<PathBuf>,
    /// One save at a time (the periodic one and the one at shutdown write the same files).
    saving: Mutex<()>,
    /// (wall-clock seconds, the monotonic instant they were read at).
    anchor: Mutex<(u64, Instant)>,
}

impl Ledger {
    /// The ledger kept under `state_dir` (None: in memory only), with today's counts read back.
    pub fn open(state_dir: Option<&Path>) -> Self {
        let anchor = (wall_clock(), Instant::now());
        let path = state_dir.map(|dir| dir.join(FILE));
        let today = anchor.0 / DAY;
        let mut day = Day::new(today, new_id());
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Day>(&bytes) {
                    Ok(saved) if saved.utc_day == today => day = saved,
                    Ok(saved) => day.id = saved.id,
                    Err(err) => {
                        tracing::warn!(path = %path.display(), error = %err, "the token ledger is unreadable; starting it over")
                    }
                },
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!(path = %path.display(), error = %err, "cannot read the token ledger"),
            }
        }
        Self { day: Mutex::new((day, false)), path, saving: Mutex::new(()), anchor: Mutex::new(anchor) }
    }

    /// Seconds since the Unix epoch, as the ledger counts them.
    fn now(&self) -> u64 {
        let mut anchor = self.anchor.lock().unwrap_or_else(PoisonError::into_inner);
        let monotonic = anchor.0.saturating_add(anchor.1.elapsed().as_secs());
        let wall = wall_clock();
        if wall > monotonic.saturating_add(60) {
            *anchor = (wall, Instant::now());
            return wall;
        }
        monotonic
    }

    /// Today's counts (started over when the day turned).
    fn today(&self) -> MutexGuard<'_, (Day, bool)> {
        let today = self.now() / DAY;
        let mut day = self.day.lock().unwrap_or_else(PoisonError::into_inner);
        if day.0.utc_day != today {
            let id = std::mem::take(&mut day.0.id);
            *day = (Day::new(today, id), true);
        }
        if day.0.id.is_empty() {
            // A state file from before ledger ids: the new id is written at the next save.
            day.0.id = new_id();
            day.1 = true;
        }
        day
    }

    /// Tokens `client` used today: here, or in the cluster (its sum as last read, plus what was charged
    /// here since this instance's totals were last written).
    pub fn used(&self, client: &str) -> u64 {
        let day = self.today();
        let here = day.0.tokens.get(client).copied().unwrap_or(0);
        let Some(cluster) = &day.0.cluster else { return here };
        let since = here.saturating_sub(day.0.written.get(client).copied().unwrap_or(0));
        here.max(cluster.get(client).copied().unwrap_or(0).saturating_add(since))
    }

    /// The day, this ledger's id, and its totals of the day per client.
    pub fn totals(&self) -> (u64, String, Vec<(String, u64)>) {
        let day = self.today();
        let totals = day.0.tokens.iter().map(|(client, n)| (client.clone(), *n)).collect();
        (day.0.utc_day, day.0.id.clone(), totals)
    }

    /// `written` (this ledger's totals of `utc_day`) is in the cluster's counts, whose sums are `cluster`.
    pub fn shared(&self, utc_day: u64, written: Vec<(String, u64)>, cluster: BTreeMap<String, u64>) {
        let mut day = self.today();
        if day.0.utc_day == utc_day {
            day.0.written = written.into_iter().collect();
            day.0.cluster = Some(cluster);
        }
    }

    /// Adds `tokens` to `client`'s day.
    pub fn charge(&self, client: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let mut day = self.today();
        let used = day.0.tokens.entry(client.to_string()).or_default();
        *used = used.saturating_add(tokens);
        day.1 = true;
    }

    /// Refuses a request of `client` once its day's tokens reached `quota`: 429 until the next midnight.
    pub fn check(&self, client: &str, quota: Option<u64>) -> Result<(), ProxyError> {
        let Some(quota) = quota else { return Ok(()) };
        let used = self.used(client);
        if used < quota {
            return Ok(());
        }
        let retry_after = DAY - self.now() % DAY;
        Err(ProxyError::QuotaExceeded { client: client.to_string(), used, quota, retry_after })
    }

    /// Writes the day to the state file if it changed: atomically (a temporary file, flushed to disk,
    /// renamed over it), one save at a time; a failed save is tried again at the next.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let _one_at_a_time = self.saving.lock().unwrap_or_else(PoisonError::into_inner);
        let bytes = {
            let mut day = self.today();
            if !std::mem::replace(&mut day.1, false) {
                return Ok(());
            }
            serde_json::to_vec_pretty(&day.0).map_err(std::io::Error::other)?
        };
        let written = write_atomically(path, &bytes);
        if written.is_err() {
            self.today().1 = true;
        }
        written
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        // The rename itself survives a power loss once the directory is flushed too.
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn wall_clock() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes the ledger every `SAVE_EVERY` while it changes, until it is dropped.
pub async fn keep_saved(ledger: Weak<Ledger>) {
    loop {
        tokio::time::sleep(SAVE_EVERY).await;
        let Some(ledger) = ledger.upgrade() else { return };
        let saved = tokio::task::spawn_blocking(move || ledger.save()).await;
        if let Ok(Err(err)) = saved {
            tracing::warn!(error = %err, "cannot write the token ledger (server.state_dir)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_reset_at_midnight_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("sluice-ledger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ledger = Ledger::open(Some(&dir));
        ledger.charge("batch", 700);
        assert!(ledger.check("batch", Some(1000)).is_ok());
        ledger.charge("batch", 300);
        let Err(ProxyError::QuotaExceeded { retry_after, .. }) = ledger.check("batch", Some(1000)) else {
            panic!("over its quota")
        };
        assert!((1..=DAY).contains(&retry_after));
        assert!(ledger.check("other", Some(1000)).is_ok(), "each client has its own");
        ledger.save().unwrap();
        let reopened = Ledger::open(Some(&dir));
        assert_eq!(reopened.used("batch"), 1000, "read back after a restart");
        assert_eq!(reopened.totals().1, ledger.totals().1, "under the same ledger id");
        tokio::time::advance(Duration::from_secs(retry_after)).await;
        assert_eq!(reopened.used("batch"), 0, "a new day");
        assert!(reopened.check("batch", Some(1000)).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn in_a_cluster_the_count_is_the_clusters_plus_what_was_charged_since() {
        let ledger = Ledger::open(None);
        ledger.charge("a", 100);
        let (day, id, totals) = ledger.totals();
        assert_eq!(totals, vec![("a".to_string(), 100)]);
        assert_eq!(id.len(), 16);
        // Another instance charged 900 meanwhile.
        ledger.shared(day, totals, BTreeMap::from([("a".to_string(), 1000)]));
        assert_eq!(ledger.used("a"), 1000, "the cluster's count");
        ledger.charge("a", 50);
        assert_eq!(ledger.used("a"), 1050, "plus what was charged here since");
        assert_eq!(ledger.totals().2, vec![("a".to_string(), 150)], "its own totals, written again whole");
        ledger.shared(day + 1, vec![("a".to_string(), 150)], BTreeMap::new());
        assert_eq!(ledger.used("a"), 1050, "another day's answer changes nothing");
        assert_eq!(ledger.totals().1, id, "one id");
    }
}
