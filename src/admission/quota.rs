//! Each configured client's share of admission: the upstream slots it may hold at once, its own rate
//! (GCRA) and its share of the queue. Slots and rate *wait* — a client at its cap stays in the fair queue
//! while others are served, and is looked at again on a release or at its next token; the queue share
//! refuses at once. Callers that are not configured clients have no quota here. Plain state fed with the
//! time, like the rest of `admission/`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::gcra::Gcra;
use super::queue::ClientId;

/// What one configured client may use.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientLimits {
    /// The client's name (for `/status` and metrics).
    pub name: Arc<str>,
    pub max_concurrency: Option<usize>,
    /// Steady interval between two requests, and the burst.
    pub rate: Option<(Duration, u32)>,
    pub max_queued: Option<usize>,
}

/// A configured client's use right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    pub name: Arc<str>,
    pub queued: usize,
    pub inflight: usize,
    /// Of its queued requests: how many by priority (low, normal, high), and the longest wait so far.
    pub waiting: Waiting,
}

/// Who waits in the queue, for `/status`: by priority, and the longest wait so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waiting {
    pub by_priority: [usize; 3],
    pub oldest: Option<std::time::Duration>,
}

struct Quota {
    limits: ClientLimits,
    gcra: Option<Gcra>,
    queued: usize,
    inflight: usize,
    /// Kept only until its last queued or in-flight request ends (a reload removed the client).
    removed: bool,
}

/// The quotas of every configured client, by client id.
#[derive(Default)]
pub struct Quotas {
    clients: super::Map<ClientId, Quota>,
}

/// Whether a client's next request may be dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    Now,
    /// Its rate allows one at this instant.
    At(Instant),
    /// It holds all its slots: after one of them comes back.
    AfterRelease,
}

impl Quotas {
    /// Puts a new set of clients in force, keeping what each holds and owes; a removed client's requests
    /// finish unlimited.
    pub fn reconfigure(&mut self, clients: Vec<(ClientId, ClientLimits)>) {
        for quota in self.clients.values_mut() {
            quota.removed = true;
        }
        for (id, limits) in clients {
            let quota = self.clients.entry(id).or_insert_with(|| Quota {
                limits: limits.clone(),
                gcra: None,
                queued: 0,
                inflight: 0,
                removed: false,
            });
            match (&mut quota.gcra, limits.rate) {
                // A new rate applies to what is owed, without a fresh burst.
                (Some(gcra), Some((interval, burst))) if quota.limits.rate.map(|r| r.1) == Some(burst) => {
                    gcra.set_interval(interval, Instant::now());
                }
                (gcra, rate) => *gcra = rate.map(|(interval, burst)| Gcra::new(interval, burst)),
            }
            quota.limits = limits;
            quota.removed = false;
        }
        self.clients.retain(|_, q| !q.removed || q.queued > 0 || q.inflight > 0);
        for quota in self.clients.values_mut().filter(|q| q.removed) {
            quota.limits.max_concurrency = None;
            quota.limits.rate = None;
            quota.limits.max_queued = None;
            quota.gcra = None;
        }
    }

    /// Whether `client` may queue one more request.
    pub fn may_queue(&self, client: ClientId) -> Result<(), usize> {
        match self.clients.get(&client) {
            Some(q) if q.limits.max_queued.is_some_and(|max| q.queued >= max) => Err(q.queued),
            _ => Ok(()),
        }
    }

    /// Counts a queued request of `client`; returns whether it was counted (only then is it uncounted).
    pub fn queued(&mut self, client: ClientId) -> bool {
        self.clients.get_mut(&client).map(|quota| quota.queued += 1).is_some()
    }

    pub fn unqueued(&mut self, client: ClientId, counted: bool) {
        if !counted {
            return;
        }
        if let Some(quota) = self.clients.get_mut(&client) {
            quota.queued = quota.queued.saturating_sub(1);
        }
        self.forget_if_done(client);
    }

    /// Whether `client`'s next request may go now.
    pub fn turn(&self, client: ClientId, now: Instant) -> Turn {
        let Some(quota) = self.clients.get(&client) else { return Turn::Now };
        if quota.limits.max_concurrency.is_some_and(|max| quota.inflight >= max) {
            return Turn::AfterRelease;
        }
        match quota.gcra.as_ref().and_then(|g| g.wait(now)) {
            Some(wait) => now.checked_add(wait).map_or(Turn::AfterRelease, Turn::At),
            None => Turn::Now,
        }
    }

    /// The earliest instant a queued client held back by its rate may go.
    pub fn next_turn(&self, now: Instant) -> Option<Instant> {
        self.clients
            .keys()
            .filter(|id| self.clients[id].queued > 0)
            .filter_map(|id| match self.turn(*id, now) {
                Turn::At(at) => Some(at),
                _ => None,
            })
            .min()
    }

    /// `client` took a slot (and a token of its rate); returns whether it was counted.
    pub fn took(&mut self, client: ClientId, now: Instant) -> bool {
        let Some(quota) = self.clients.get_mut(&client) else { return false };
        quota.inflight += 1;
        if let Some(gcra) = &mut quota.gcra {
            let _ = gcra.take(now);
        }
        true
    }

    /// `client` gave back a slot (counted when it was taken: a client removed and added again by reloads
    /// in between is not short of one).
    pub fn released(&mut self, client: ClientId, counted: bool) {
        if !counted {
            return;
        }
        if let Some(quota) = self.clients.get_mut(&client) {
            quota.inflight = quota.inflight.saturating_sub(1);
        }
        self.forget_if_done(client);
    }

    fn forget_if_done(&mut self, client: ClientId) {
        if self.clients.get(&client).is_some_and(|q| q.removed && q.queued == 0 && q.inflight == 0) {
            self.clients.remove(&client);
        }
    }

    /// Every configured client's use, by name.
    /// Whether `client` is a configured client (one `views_with` lists).
    pub fn lists(&self, client: ClientId) -> bool {
        self.clients.get(&client).is_some_and(|q| !q.removed)
    }

    /// Each configured client's view, with what `waiting` says of its queued requests.
    pub fn views_with(&self, waiting: &HashMap<ClientId, Waiting>) -> Vec<ClientView> {
        let mut views: Vec<ClientView> = self
            .clients
            .iter()
            .filter(|(_, q)| !q.removed)
            .map(|(id, q)| ClientView {
                name: q.limits.name.clone(),
                queued: q.queued,
                inflight: q.inflight,
                waiting: waiting.get(id).copied().unwrap_or_default(),
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(concurrency: Option<usize>, rate: Option<(Duration, u32)>, queued: Option<usize>) -> ClientLimits {
        ClientLimits { name: Arc::from("batch"), max_concurrency: concurrency, rate, max_queued: queued }
    }

    #[tokio::test(start_paused = true)]
    async fn slots_rate_and_queue_share() {
        let mut quotas = Quotas::default();
        quotas.reconfigure(vec![(7, limits(Some(2), Some((Duration::from_secs(1), 1)), Some(1)))]);
        let now = Instant::now();
        assert_eq!(quotas.turn(99, now), Turn::Now, "callers without a quota are never held");
        assert_eq!(quotas.turn(7, now), Turn::Now);
        assert!(quotas.took(7, now));
        assert_eq!(quotas.turn(7, now), Turn::At(now + Duration::from_secs(1)), "its rate");
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        quotas.took(7, now);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(quotas.turn(7, Instant::now()), Turn::AfterRelease, "both slots held");
        quotas.released(7, true);
        assert_eq!(quotas.turn(7, Instant::now()), Turn::Now);
        assert_eq!(quotas.may_queue(7), Ok(()));
        assert!(quotas.queued(7));
        assert_eq!(quotas.may_queue(7), Err(1), "its share of the queue");
        assert_eq!(
            quotas.views_with(&HashMap::new())[0],
            ClientView { name: Arc::from("batch"), queued: 1, inflight: 1, waiting: Waiting::default() }
        );
    }

    #[test]
    fn a_reload_keeps_counts_and_a_removed_client_finishes_unlimited() {
        let mut quotas = Quotas::default();
        quotas.reconfigure(vec![(7, limits(Some(1), None, None))]);
        let counted = quotas.took(7, Instant::now());
        quotas.reconfigure(vec![(7, limits(Some(3), None, None))]);
        assert_eq!(quotas.views_with(&HashMap::new())[0].inflight, 1, "what it holds is kept");
        quotas.reconfigure(vec![]);
        assert!(quotas.views_with(&HashMap::new()).is_empty());
        assert_eq!(quotas.turn(7, Instant::now()), Turn::Now);
        quotas.released(7, counted);
        assert!(quotas.clients.is_empty(), "forgotten once its last request ended");
        // Removed while idle, a request taken uncounted, added again: its release takes nothing away.
        let uncounted = quotas.took(7, Instant::now());
        assert!(!uncounted);
        quotas.reconfigure(vec![(7, limits(Some(1), None, None))]);
        assert!(quotas.took(7, Instant::now()));
        quotas.released(7, uncounted);
        assert_eq!(quotas.turn(7, Instant::now()), Turn::AfterRelease, "the counted one still holds its slot");
    }
}
