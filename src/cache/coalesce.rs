//! Coalescing: one upstream call shared by every identical request that arrives while it is queued or in
//! flight. The call belongs to the group, not to the client that started it: it runs in its own task and
//! records its outcome (the head, or an error) and every body chunk here; each member reads them from the
//! beginning, then live as they arrive. When the last member leaves, the call is aborted (its queue place
//! or its slot goes back). Bounded: `MAX_FOLLOWERS` per call; and once a call has produced `MAX_CALL_BYTES`,
//! or all calls together keep `MAX_RECORDED_BYTES`, it takes no one new, is not stored, and keeps only what
//! its slowest member has yet to read — and past `BACKLOG` of that, the call waits for the member (as a
//! socket buffer would) rather than buffer more.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::key::Key;

/// Members that may join one call besides the first.
pub const MAX_FOLLOWERS: usize = 256;
/// Bytes a call keeps from its beginning for members joining late (and for the cache).
pub const MAX_CALL_BYTES: usize = 8 * 1024 * 1024;
/// Bytes all calls together keep from their beginnings.
pub const MAX_RECORDED_BYTES: usize = 256 * 1024 * 1024;
/// Unread bytes a call keeps for its slowest member once it no longer keeps its beginning.
pub const BACKLOG: usize = 64 * 1024;

/// How a call's body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Complete,
    /// A stream cut mid-way: it ends with sluice's error event, already recorded.
    Cut,
    /// Any other body cut mid-way: each member's response is aborted.
    Aborted,
}

/// One upstream call and everything it produced so far. `H` is its outcome (the response head, or the
/// error every member answers with).
pub struct Call<H> {
    state: Mutex<State<H>>,
    head_ready: Notify,
    /// Bytes kept by all calls together (shared with the coalescer).
    recorded: Arc<AtomicUsize>,
}

struct State<H> {
    head: Option<H>,
    chunks: VecDeque<Bytes>,
    /// The index (since the call began) of `chunks[0]`.
    first: usize,
    /// Bytes in `chunks`.
    retained: usize,
    /// Bytes ever recorded.
    total: usize,
    /// Every byte since the beginning is kept (for late joiners and the store); false past the bounds.
    whole: bool,
    end: Option<Ending>,
    /// Each member's next chunk index and waker.
    readers: HashMap<u64, Position>,
    next_reader: u64,
    followers: usize,
    /// Members may still join.
    joinable: bool,
    /// The call's task, aborted when the last member leaves.
    abort: Option<AbortHandle>,
    /// The call's task, waiting for its slowest member.
    writer: Option<Waker>,
}

struct Position {
    next: usize,
    waker: Option<Waker>,
}

impl<H: Clone> Call<H> {
    /// A new call with its first member; `recorded` counts the bytes all calls keep.
    pub fn start(recorded: Arc<AtomicUsize>) -> (Arc<Self>, Member<H>) {
        let state = State {
            head: None,
            chunks: VecDeque::new(),
            first: 0,
            retained: 0,
            total: 0,
            whole: true,
            end: None,
            readers: HashMap::new(),
            next_reader: 0,
            followers: 0,
            joinable: true,
            abort: None,
            writer: None,
        };
        let call = Arc::new(Self { state: Mutex::new(state), head_ready: Notify::new(), recorded });
        let member = call.add_member(); // id 0: the first
        (call, member)
    }

    fn state(&self) -> MutexGuard<'_, State<H>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add_member(self: &Arc<Self>) -> Member<H> {
        let mut state = self.state();
        Self::add_member_locked(self, &mut state)
    }

    fn add_member_locked(self: &Arc<Self>, state: &mut State<H>) -> Member<H> {
        let id = state.next_reader;
        state.next_reader += 1;
        let next = state.first;
        state.readers.insert(id, Position { next, waker: None });
        Member { call: self.clone(), id }
    }

    /// A follower, if the call still takes one (checked and joined under one lock: nothing is trimmed
    /// and no last member leaves in between).
    pub fn join(self: &Arc<Self>) -> Option<Member<H>> {
        let mut state = self.state();
        if !state.joinable || !state.whole || state.followers >= MAX_FOLLOWERS || state.readers.is_empty() {
            return None;
        }
        state.followers += 1;
        Some(Self::add_member_locked(self, &mut state))
    }

    /// Members that joined after the first and have not left before the end.
    pub fn followers(&self) -> usize {
        self.state().followers
    }

    /// The task running the call: aborted when the last member leaves (at once, if none is left).
    pub fn set_task(&self, abort: AbortHandle) {
        let mut state = self.state();
        if state.readers.is_empty() {
            abort.abort();
        }
        state.abort = Some(abort);
    }

    /// Publishes the outcome; a failure also ends the call for joining.
    pub fn publish(&self, head: H, joinable: bool) {
        {
            let mut state = self.state();
            state.head = Some(head);
            state.joinable &= joinable;
        }
        self.head_ready.notify_waiters();
    }

    /// Records a body chunk and wakes the members waiting for it.
    pub fn push(&self, chunk: Bytes) {
        let mut state = self.state();
        let len = chunk.len();
        state.total = state.total.saturating_add(len);
        state.retained += len;
        state.chunks.push_back(chunk);
        let all = self.recorded.fetch_add(len, Ordering::AcqRel).saturating_add(len);
        if state.total > MAX_CALL_BYTES || all > MAX_RECORDED_BYTES {
            state.whole = false;
            state.joinable = false;
        }
        let dropped = state.trim();
        self.recorded.fetch_sub(dropped, Ordering::AcqRel);
        state.wake_readers();
    }

    /// Ends a call that stopped without its own end: the outcome `head` if it had none yet, and the body
    /// (if any) aborted.
    pub fn abandon(&self, head: H) {
        let had_head = {
            let mut state = self.state();
            let had_head = state.head.is_some();
            state.head.get_or_insert(head);
            state.end.get_or_insert(Ending::Aborted);
            state.joinable = false;
            state.wake_readers();
            had_head
        };
        if !had_head {
            self.head_ready.notify_waiters();
        }
    }

    /// Records the end of the body.
    pub fn end(&self, ending: Ending) {
        let mut state = self.state();
        state.end = Some(ending);
        state.joinable = false;
        state.wake_readers();
    }

    /// Ready when the call may read on: it keeps its whole body, or its slowest member's backlog is
    /// within `BACKLOG`.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state();
        if state.whole || state.retained <= BACKLOG || state.readers.is_empty() {
            return Poll::Ready(());
        }
        state.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The whole body, if every byte is still kept (for storing it).
    pub fn recorded(&self) -> Option<Bytes> {
        let state = self.state();
        (state.first == 0 && state.whole).then(|| {
            let mut body = Vec::with_capacity(state.retained);
            for chunk in &state.chunks {
                body.extend_from_slice(chunk);
            }
            Bytes::from(body)
        })
    }
}

impl<H> State<H> {
    fn wake_readers(&mut self) {
        for position in self.readers.values_mut() {
            if let Some(waker) = position.waker.take() {
                waker.wake();
            }
        }
    }

    /// Past the bounds (the beginning is no longer kept for anyone): drops what every member has read.
    /// Returns the bytes dropped.
    fn trim(&mut self) -> usize {
        if self.whole {
            return 0;
        }
        let slowest = self.readers.values().map(|p| p.next).min().unwrap_or(usize::MAX);
        let mut dropped = 0;
        while self.first < slowest {
            let Some(chunk) = self.chunks.pop_front() else { break };
            dropped += chunk.len();
            self.first += 1;
        }
        self.retained -= dropped;
        if self.retained <= BACKLOG {
            if let Some(writer) = self.writer.take() {
                writer.wake();
            }
        }
        dropped
    }
}

/// One request's share of a call: it waits for the outcome, then reads the body from the beginning.
/// Dropping the last member aborts the call.
pub struct Member<H> {
    call: Arc<Call<H>>,
    id: u64,
}

impl<H: Clone> Member<H> {
    /// The call's outcome, once there is one.
    pub async fn head(&self) -> H {
        loop {
            let notified = self.call.head_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(head) = self.call.state().head.clone() {
                return head;
            }
            notified.await;
        }
    }

    /// The next chunk for this member: `Some(Ok)`, then `None` at the end — or `Some(Err(Aborted))` once
    /// when the body was aborted (after its last recorded chunk).
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Ending>>> {
        let mut state = self.call.state();
        let State { readers, chunks, first, end, .. } = &mut *state;
        let Some(position) = readers.get_mut(&self.id) else { return Poll::Ready(None) };
        if let Some(chunk) = chunks.get(position.next - *first) {
            let chunk = chunk.clone();
            position.next += 1;
            let dropped = state.trim();
            self.call.recorded.fetch_sub(dropped, Ordering::AcqRel);
            return Poll::Ready(Some(Ok(chunk)));
        }
        match *end {
            Some(Ending::Complete | Ending::Cut) => Poll::Ready(None),
            Some(Ending::Aborted) => {
                readers.remove(&self.id);
                Poll::Ready(Some(Err(Ending::Aborted)))
            }
            None => {
                position.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Whether the call's body was cut.
    pub fn broke(&self) -> bool {
        matches!(self.call.state().end, Some(Ending::Cut | Ending::Aborted))
    }
}

impl<H> Drop for Member<H> {
    fn drop(&mut self) {
        let mut state = self.call.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.readers.remove(&self.id);
        if self.id != 0 && state.end.is_none() {
            state.followers = state.followers.saturating_sub(1); // it leaves without the answer
        }
        let dropped = state.trim();
        self.call.recorded.fetch_sub(dropped, Ordering::AcqRel);
        if state.readers.is_empty() && state.end.is_none() {
            state.joinable = false;
            if let Some(abort) = state.abort.take() {
                abort.abort();
            }
        }
    }
}

impl<H> Drop for Call<H> {
    fn drop(&mut self) {
        let retained = self.state.get_mut().unwrap_or_else(PoisonError::into_inner).retained;
        self.recorded.fetch_sub(retained, Ordering::AcqRel);
    }
}

/// The calls in flight that identical requests may join, by key.
pub struct Coalescer<H> {
    calls: Mutex<HashMap<Key, Weak<Call<H>>>>,
    /// Bytes kept by all calls together.
    recorded: Arc<AtomicUsize>,
}

impl<H> Default for Coalescer<H> {
    fn default() -> Self {
        Self { calls: Mutex::new(HashMap::new()), recorded: Arc::default() }
    }
}

/// What a request got from the coalescer.
pub enum Joined<H> {
    /// A member of the call in flight.
    Follower(Member<H>),
    /// The first: the caller starts the call.
    Leader(Arc<Call<H>>, Member<H>),
    /// The call in flight takes no one more: the request goes its own way.
    Full,
}

impl<H: Clone> Coalescer<H> {
    /// Joins the call in flight under `key`, or registers a new one for the caller to start.
    pub fn join_or_lead(&self, key: Key) -> Joined<H> {
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(call) = calls.get(&key).and_then(Weak::upgrade) {
            if call.state().joinable {
                return call.join().map_or(Joined::Full, Joined::Follower);
            }
        }
        if calls.len() >= 64 && calls.len().is_power_of_two() {
            calls.retain(|_, call| call.upgrade().is_some_and(|c| c.state().joinable));
        }
        let (call, member) = Call::start(self.recorded.clone());
        calls.insert(key, Arc::downgrade(&call));
        Joined::Leader(call, member)
    }

    /// A call no one may join (`refresh`, or with coalescing off), still counted in the bound.
    pub fn alone(&self) -> (Arc<Call<H>>, Member<H>) {
        Call::start(self.recorded.clone())
    }

    /// Bytes all calls keep now.
    pub fn recorded_bytes(&self) -> usize {
        self.recorded.load(Ordering::Acquire)
    }

    /// Calls registered (some may have ended).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    async fn next(member: &mut Member<u16>) -> Option<Result<Bytes, Ending>> {
        poll_fn(|cx| member.poll_chunk(cx)).await
    }

    #[tokio::test]
    async fn followers_read_from_the_beginning_then_live() {
        let coalescer = Coalescer::<u16>::default();
        let key = Key([1; 32]);
        let Joined::Leader(call, mut first) = coalescer.join_or_lead(key) else { panic!("first leads") };
        call.publish(200, true);
        call.push(Bytes::from_static(b"a"));
        let Joined::Follower(mut late) = coalescer.join_or_lead(key) else { panic!("second follows") };
        assert_eq!(late.head().await, 200);
        assert_eq!(next(&mut late).await, Some(Ok(Bytes::from_static(b"a"))));
        call.push(Bytes::from_static(b"b"));
        call.end(Ending::Complete);
        for member in [&mut first, &mut late] {
            let mut got = Vec::new();
            while let Some(Ok(chunk)) = next(member).await {
                got.extend_from_slice(&chunk);
            }
            assert!(got.ends_with(b"b"));
        }
        assert_eq!(call.recorded().as_deref(), Some(&b"ab"[..]));
        assert_eq!(call.followers(), 1);
        assert!(matches!(coalescer.join_or_lead(key), Joined::Leader(..)), "an ended call takes no one");
    }

    #[tokio::test]
    async fn the_last_member_leaving_aborts_the_call_but_not_before() {
        let (call, first) = Call::<u16>::start(Arc::default());
        let second = call.join().unwrap();
        let task = tokio::spawn(std::future::pending::<()>());
        call.set_task(task.abort_handle());
        drop(first);
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "one member is left");
        drop(second);
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(call.join().is_none());
    }

    #[tokio::test]
    async fn a_cut_body_reaches_every_member_as_broken() {
        let (call, mut member) = Call::<u16>::start(Arc::default());
        call.publish(200, true);
        call.push(Bytes::from_static(b"part"));
        call.end(Ending::Aborted);
        assert_eq!(next(&mut member).await, Some(Ok(Bytes::from_static(b"part"))));
        assert_eq!(next(&mut member).await, Some(Err(Ending::Aborted)));
        assert_eq!(next(&mut member).await, None);
    }

    #[test]
    fn followers_and_bytes_are_bounded() {
        let (call, _first) = Call::<u16>::start(Arc::default());
        let followers: Vec<_> = (0..MAX_FOLLOWERS).map(|_| call.join().unwrap()).collect();
        assert!(call.join().is_none(), "beyond MAX_FOLLOWERS: the request goes its own way");
        drop(followers);
        let (call, mut member) = Call::<u16>::start(Arc::default());
        let chunk = Bytes::from(vec![0u8; 1024 * 1024]);
        for _ in 0..=8 {
            call.push(chunk.clone());
        }
        assert!(call.join().is_none(), "past MAX_CALL_BYTES no one joins");
        assert!(call.recorded().is_none(), "nor is it stored");
        let mut cx = Context::from_waker(Waker::noop());
        assert!(call.poll_room(&mut cx).is_pending(), "the call waits for its slowest member");
        assert!(matches!(member.poll_chunk(&mut cx), Poll::Ready(Some(Ok(_)))));
        assert!(call.poll_room(&mut cx).is_pending(), "8 MiB unread is more than a backlog");
        while let Poll::Ready(Some(Ok(_))) = member.poll_chunk(&mut cx) {}
        assert!(call.poll_room(&mut cx).is_ready(), "what was read is dropped");
    }

    #[test]
    fn all_calls_together_keep_a_bounded_amount() {
        let coalescer = Coalescer::<u16>::default();
        let chunk = Bytes::from(vec![0u8; 1024 * 1024]); // shared: counted per push, allocated once
        let mut calls = Vec::new();
        for n in 0..40u8 {
            let Joined::Leader(call, member) = coalescer.join_or_lead(Key([n; 32])) else { panic!() };
            for _ in 0..7 {
                call.push(chunk.clone());
            }
            calls.push((call, member));
        }
        assert!(calls[0].0.recorded().is_some(), "the first calls keep their whole body");
        let (last, member) = &mut calls[39];
        assert!(last.recorded().is_none(), "past the bound a call keeps only what is unread");
        assert!(last.join().is_none());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(last.poll_room(&mut cx).is_pending(), "and waits for its member to read");
        let before = coalescer.recorded_bytes();
        while let Poll::Ready(Some(Ok(_))) = member.poll_chunk(&mut cx) {}
        assert_eq!(coalescer.recorded_bytes(), before - 7 * chunk.len(), "what was read is given back");
        assert!(last.poll_room(&mut cx).is_ready());
        drop(calls);
        assert_eq!(coalescer.recorded_bytes(), 0, "every byte is given back");
    }

    #[test]
    fn ended_calls_are_swept_from_the_map() {
        let coalescer = Coalescer::<u16>::default();
        for n in 0..=200u8 {
            let Joined::Leader(call, _member) = coalescer.join_or_lead(Key([n; 32])) else { panic!() };
            call.end(Ending::Complete);
        }
        assert!(coalescer.len() < 150, "{}", coalescer.len());
    }
}
