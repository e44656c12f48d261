//! The fair queue: three priority classes, and inside each class one FIFO per client served round-robin,
//! so a client flooding the queue cannot starve one sending a little. It stores entry ids only; whether
//! an id is still waiting (not cancelled or expired) is the caller's business.
//!
//! Priority rule: the highest class with waiting entries goes first, except that a class passed over
//! `STARVATION_LIMIT` times in a row while it had entries gets the next dispatch. So `low` still gets
//! at least one of roughly every nine dispatches under a flood of `high`.
//!
//! A client held back by its own quota (`quota.rs`) is passed over: `peek_where` picks among the clients
//! the caller accepts, so the others are served meanwhile and the held client keeps its place.

use std::collections::VecDeque;

/// How often a waiting class may be passed over before it is served anyway.
pub const STARVATION_LIMIT: u32 = 8;

/// A request's priority class, from `x-sluice-priority: high|normal|low`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// Reads the header value; anything unknown is `normal`.
    pub fn from_header(value: &[u8]) -> Self {
        match value {
            v if v.eq_ignore_ascii_case(b"high") => Priority::High,
            v if v.eq_ignore_ascii_case(b"low") => Priority::Low,
            _ => Priority::Normal,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// Who a request belongs to, for round-robin fairness (a hash; see `proxy::request`).
pub type ClientId = u64;

/// One priority class: a FIFO per client and the ring of clients that have entries.
#[derive(Default, Clone)]
struct Class {
    fifos: super::Map<ClientId, VecDeque<u64>>,
    ring: VecDeque<ClientId>,
    len: usize,
}

impl Class {
    fn push(&mut self, client: ClientId, id: u64, front: bool) {
        let fifo = self.fifos.entry(client).or_default();
        if fifo.is_empty() {
            self.ring.push_back(client);
        }
        if front {
            fifo.push_front(id);
        } else {
            fifo.push_back(id);
        }
        self.len += 1;
    }

    fn pop(&mut self) -> Option<u64> {
        let client = *self.ring.front()?;
        self.take(client)
    }

    /// The first client in ring order that `ok` accepts, and its next entry.
    fn peek_where(&self, ok: &impl Fn(ClientId) -> bool) -> Option<(ClientId, u64)> {
        let client = self.ring.iter().find(|c| ok(**c))?;
        Some((*client, *self.fifos.get(client)?.front()?))
    }

    /// Takes `client`'s next entry; the client goes to the back of the ring.
    fn take(&mut self, client: ClientId) -> Option<u64> {
        let at = self.ring.iter().position(|c| *c == client)?;
        self.ring.remove(at);
        let fifo = self.fifos.get_mut(&client)?;
        let id = fifo.pop_front();
        if fifo.is_empty() {
            self.fifos.remove(&client);
        } else {
            self.ring.push_back(client);
        }
        if id.is_some() {
            self.len -= 1;
        }
        id
    }

    fn retain(&mut self, keep: &mut impl FnMut(u64) -> bool) {
        self.fifos.retain(|_, fifo| {
            fifo.retain(|id| keep(*id));
            !fifo.is_empty()
        });
        let fifos = &self.fifos;
        self.ring.retain(|client| fifos.contains_key(client));
        self.len = self.fifos.values().map(VecDeque::len).sum();
    }
}

/// An entry chosen by `peek_where`, to `take`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    class: usize,
    pub client: ClientId,
    pub id: u64,
}

/// Entry ids waiting in priority classes, fair across clients.
#[derive(Default, Clone)]
pub struct FairQueue {
    classes: [Class; 3],
    /// Dispatches that went to another class while this one had entries.
    skips: [u32; 3],
}

impl FairQueue {
    /// Adds an entry at the back of its client's FIFO, or at the front (a retry keeps its place
    /// ahead of the client's newer requests).
    pub fn push(&mut self, priority: Priority, client: ClientId, id: u64, front: bool) {
        self.classes[priority as usize].push(client, id, front);
    }

    /// Entries stored, including ones the caller has since given up on.
    pub fn len(&self) -> usize {
        self.classes.iter().map(|c| c.len).sum()
    }

    /// The class the next dispatch goes to (see the module doc for the rule).
    fn next_class(&self) -> Option<usize> {
        let waiting = |c: &usize| self.classes[*c].len > 0;
        (0..3).filter(waiting).find(|c| self.skips[*c] >= STARVATION_LIMIT).or_else(|| (0..3).find(waiting))
    }

    /// Takes the next id: class by priority rule, client by round-robin, FIFO inside the client.
    pub fn pop(&mut self) -> Option<u64> {
        let chosen = self.next_class()?;
        for class in 0..3 {
            if class == chosen {
                self.skips[class] = 0;
            } else if self.classes[class].len > 0 {
                self.skips[class] = self.skips[class].saturating_add(1);
            }
        }
        self.classes[chosen].pop()
    }

    /// The entry `take` would take among clients `ok` accepts: the class by the priority rule (among
    /// classes with such a client), the client by round-robin.
    pub fn peek_where(&self, ok: impl Fn(ClientId) -> bool) -> Option<Pick> {
        let waiting = |c: &usize| self.classes[*c].peek_where(&ok).is_some();
        let class =
            (0..3).filter(|c| self.skips[*c] >= STARVATION_LIMIT).find(waiting).or_else(|| (0..3).find(waiting))?;
        let (client, id) = self.classes[class].peek_where(&ok)?;
        Some(Pick { class, client, id })
    }

    /// Takes a picked entry (as `pop` would: the other waiting classes count a skip).
    pub fn take(&mut self, pick: Pick) -> Option<u64> {
        for class in 0..3 {
            if class == pick.class {
                self.skips[class] = 0;
            } else if self.classes[class].len > 0 {
                self.skips[class] = self.skips[class].saturating_add(1);
            }
        }
        self.classes[pick.class].take(pick.client)
    }

    /// Drops every id for which `keep` says no (compaction of abandoned entries).
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        for class in &mut self.classes {
            class.retain(&mut keep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(queue: &mut FairQueue) -> Vec<u64> {
        std::iter::from_fn(|| queue.pop()).collect()
    }

    #[test]
    fn fifo_within_one_client() {
        let mut queue = FairQueue::default();
        for id in 0..5 {
            queue.push(Priority::Normal, 1, id, false);
        }
        assert_eq!(drain(&mut queue), vec![0, 1, 2, 3, 4]);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn round_robin_across_clients() {
        let mut queue = FairQueue::default();
        for id in 0..200 {
            queue.push(Priority::Normal, 1, id, false);
        }
        for id in 1000..1005 {
            queue.push(Priority::Normal, 2, id, false);
        }
        let order = drain(&mut queue);
        let first_ten = &order[..10];
        for id in 1000..1005 {
            assert!(first_ten.contains(&id), "client 2's {id} not among the first ten: {first_ten:?}");
        }
        assert_eq!(order.len(), 205);
    }

    #[test]
    fn retry_goes_to_the_front_of_its_client() {
        let mut queue = FairQueue::default();
        queue.push(Priority::Normal, 1, 1, false);
        queue.push(Priority::Normal, 1, 2, false);
        queue.push(Priority::Normal, 1, 0, true);
        assert_eq!(drain(&mut queue), vec![0, 1, 2]);
    }

    #[test]
    fn higher_class_first_but_lower_not_starved() {
        let mut queue = FairQueue::default();
        for id in 0..100 {
            queue.push(Priority::High, 1, id, false);
        }
        queue.push(Priority::Normal, 1, 500, false);
        queue.push(Priority::Low, 1, 900, false);
        let order = drain(&mut queue);
        assert_eq!(order[0], 0, "high goes first");
        let normal_at = order.iter().position(|&id| id == 500).unwrap();
        let low_at = order.iter().position(|&id| id == 900).unwrap();
        assert_eq!(normal_at as u32, STARVATION_LIMIT, "normal served after {STARVATION_LIMIT} skips");
        assert!(low_at as u32 <= STARVATION_LIMIT + 1, "low served by dispatch {low_at}");
    }

    #[test]
    fn peek_agrees_with_pop() {
        let mut queue = FairQueue::default();
        for id in 0..30 {
            let priority = Priority::ALL[(id % 3) as usize];
            queue.push(priority, id % 4, id, false);
        }
        while let Some(pick) = queue.peek_where(|_| true) {
            let mut copy = queue.clone();
            assert_eq!(copy.pop(), queue.take(pick), "with no client held, peek_where and take agree with pop");
            assert_eq!(copy.skips, queue.skips);
        }
        assert_eq!(queue.pop(), None);
    }

    #[test]
    fn retain_drops_abandoned_entries() {
        let mut queue = FairQueue::default();
        for id in 0..10 {
            queue.push(Priority::Low, id % 2, id, false);
        }
        queue.retain(|id| id % 3 == 0);
        assert_eq!(queue.len(), 4);
        let mut left = drain(&mut queue);
        left.sort_unstable();
        assert_eq!(left, vec![0, 3, 6, 9]);
    }

    #[test]
    fn a_held_client_is_passed_over_and_keeps_its_place() {
        let mut queue = FairQueue::default();
        for id in 0..3 {
            queue.push(Priority::High, 1, id, false);
        }
        queue.push(Priority::Normal, 2, 10, false);
        queue.push(Priority::Normal, 3, 20, false);
        let held = |client: ClientId| client != 1;
        let pick = queue.peek_where(held).unwrap();
        assert_eq!((pick.client, pick.id), (2, 10), "client 1 is held: the next class serves");
        assert_eq!(queue.take(pick), Some(10));
        let pick = queue.peek_where(held).unwrap();
        assert_eq!(queue.take(pick), Some(20));
        assert!(queue.peek_where(held).is_none());
        let pick = queue.peek_where(|_| true).unwrap();
        assert_eq!((pick.client, pick.id), (1, 0), "once free, client 1 goes first, in order");
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn priority_header_values() {
        assert_eq!(Priority::from_header(b"HIGH"), Priority::High);
        assert_eq!(Priority::from_header(b"low"), Priority::Low);
        assert_eq!(Priority::from_header(b"urgent"), Priority::Normal);
    }
}
