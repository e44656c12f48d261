//! The cache stage on the request path (`crate::cache` owns the store, the keys and the shared calls): a
//! hit answers at once; otherwise an eligible request joins the identical call in flight, or starts one in
//! a task of its own — so the call outlives the client that started it and serves every member — whose
//! complete, successful answer is then stored.

use std::future::poll_fn;
use std::sync::Arc;

use http::request::Parts;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::attempts::Progress;
use super::request::{BudgetHold, Inspection, Outgoing};
use super::{Generation, Proxy, ResponseBody, Track};
use crate::cache::{self, Ask, Call, Ending, Joined, Key, Member, Plan, Store};
use crate::error::ProxyError;
use crate::observe::{count_events, estimate_tokens, Charge, UsageTail};

/// What every member of a call gets: the response head (with how the call fared), or the same error.
pub type Outcome = Result<Arc<Head>, Failed>;

/// A call that ended without a response to deliver: the error, and how the call fared.
#[derive(Clone)]
pub struct Failed {
    error: ProxyError,
    progress: Progress,
}

impl Failed {
    pub fn new(error: ProxyError) -> Self {
        Self { error, progress: Progress::default() }
    }
}

/// The head of a call's response.
pub struct Head {
    status: StatusCode,
    headers: HeaderMap,
    progress: Progress,
}

/// Where the cache stage sends a request.
pub(super) enum Step {
    /// Answered from the store.
    Hit(Box<Response<ResponseBody>>),
    /// A member of the identical call in flight.
    Follow(Member<Outcome>),
    /// The first: it starts the call, whose answer goes to the store under the key.
    Lead(Arc<Call<Outcome>>, Member<Outcome>, Key, Arc<Store>),
    /// The usual way, untouched by the cache.
    Own,
}

/// What a call needs to run on its own.
pub(super) struct Work {
    pub outgoing: Outgoing,
    pub seen: Inspection,
    pub deadline: Instant,
    /// The request body's share of the budget, held until the call no longer needs the body.
    pub hold: BudgetHold,
    /// Who pays for the call's tokens: the first member's model label, client, and daily count.
    pub payer: (String, Arc<str>, Option<Charge>),
    /// Whether it streams (for a token estimate when no usage comes).
    pub stream: bool,
}

impl Proxy {
    /// The cache stage: looks the request up, joins or leads a call, and labels the request
    /// (`x-sluice-cache`, the log, the metrics).
    pub(super) async fn cache_step(
        &self,
        generation: &Generation,
        parts: &Parts,
        body: &[u8],
        track: &mut Track,
    ) -> Step {
        let Some(store) = &generation.cache else { return Step::Own };
        let config = &generation.config.cache;
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let upstream = &generation.config.upstream.base_url;
        let keyed = generation.accounts.keyed();
        let Plan::Eligible { key, ask } =
            cache::plan(config, upstream, keyed, &parts.method, path, &parts.headers, body)
        else {
            return self.labelled(track, "bypass", Step::Own);
        };
        if ask != Ask::Refresh {
            if let Some(entry) = store.get(&key).await {
                self.metrics.cache.request("hit", entry.usage);
                track.cache = Some("hit");
                let mut response = cache::hit_response(&entry);
                response.headers_mut().insert(super::UPSTREAM_HEADER, http::HeaderValue::from_static("cache"));
                return Step::Hit(Box::new(response));
            }
        }
        let joined = if config.coalesce && ask != Ask::Refresh {
            self.calls.join_or_lead(key)
        } else {
            let (call, member) = self.calls.alone();
            Joined::Leader(call, member)
        };
        match joined {
            Joined::Follower(member) => self.labelled(track, "coalesced", Step::Follow(member)),
            Joined::Leader(call, member) => self.labelled(track, "miss", Step::Lead(call, member, key, store.clone())),
            Joined::Full => self.labelled(track, "bypass", Step::Own),
        }
    }

    fn labelled(&self, track: &mut Track, result: &'static str, step: Step) -> Step {
        self.metrics.cache.request(result, None);
        track.cache = Some(result);
        step
    }

    /// Starts the call in its own task; the last member to leave aborts it.
    pub(super) fn start_call(
        self: &Arc<Self>,
        call: Arc<Call<Outcome>>,
        generation: Arc<Generation>,
        work: Work,
        storing: (Key, Arc<Store>),
    ) {
        // Made before the task: a task aborted before it first ran still answers every member.
        let unfinished = Unfinished(Some(call.clone()));
        let task = tokio::spawn(self.clone().run_call(unfinished, generation, work, storing));
        call.set_task(task.abort_handle());
    }

    /// The call: admission, the upstream and retries as for any request; then its body recorded for every
    /// member, and stored when it is a complete 200 worth keeping.
    async fn run_call(
        self: Arc<Self>,
        mut unfinished: Unfinished,
        generation: Arc<Generation>,
        work: Work,
        (key, store): (Key, Arc<Store>),
    ) {
        let Some(call) = unfinished.0.clone() else { return };
        let mut progress = Progress::default();
        let sent =
            self.send_with_retries(&generation, &work.outgoing, &work.seen, work.deadline, &mut progress, None).await;
        // The request and its body's budget share are needed no more.
        let request_bytes = work.outgoing.body().len() as u64;
        let Work { outgoing, seen, hold, payer: (model, client, charge), stream, deadline } = work;
        let request = Some((outgoing, seen, deadline, Some(hold)));
        let sent = match sent {
            Ok(sent) => sent,
            Err(error) => {
                call.publish(Err(Failed { error, progress }), false);
                call.end(Ending::Aborted);
                unfinished.0 = None;
                return;
            }
        };
        let account = sent.permit.account().to_string();
        let config = &generation.config;
        let response = match self.respond(sent, &generation, request) {
            Ok(response) => response,
            Err(error) => {
                call.publish(Err(Failed { error, progress: Progress::default() }), false);
                call.end(Ending::Aborted);
                unfinished.0 = None;
                return;
            }
        };
        let (parts, mut body) = response.into_parts();
        let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
        let status = parts.status;
        let head = Head { status, headers: parts.headers, progress };
        call.publish(Ok(Arc::new(head)), status == StatusCode::OK);
        let mut read = Read::default();
        let ending = pump(&call, &mut body, &mut read).await;
        // The slot goes back with the upstream body.
        drop(body);
        // The call's tokens, counted here once (its first client may have left), and what the followers saved.
        let usage = read.tail.usage().filter(|_| status == StatusCode::OK);
        if let Some(charge) = charge {
            let estimate = || estimate_tokens(request_bytes, read.bytes, read.events, stream);
            (charge.0)(usage.map_or_else(estimate, |u| u.prompt_tokens.saturating_add(u.completion_tokens)));
        }
        if let Some(usage) = usage {
            self.metrics.tokens_used(&model, &account, &client, &usage);
            self.metrics.cache.saved(usage, call.followers() as u64);
        }
        if ending == Ending::Complete && status == StatusCode::OK {
            let entry = call.recorded().and_then(|recorded| cache::entry_of(content_type.as_ref(), &recorded));
            if let Some(entry) = entry {
                store.put(key, Arc::new(entry), config.cache.ttl);
            }
        }
        call.end(ending);
        unfinished.0 = None;
    }
}

/// What the call read of its body: the tail for `usage`, bytes and stream events (for an estimate).
#[derive(Default)]
struct Read {
    tail: UsageTail,
    bytes: u64,
    events: u64,
}

/// Moves the upstream body into the call, chunk by chunk, as fast as its slowest member allows.
async fn pump(call: &Call<Outcome>, body: &mut ResponseBody, read: &mut Read) -> Ending {
    loop {
        poll_fn(|cx| call.poll_room(cx)).await;
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read.tail.observe(&data);
                    read.bytes += data.len() as u64;
                    read.events += count_events(&data);
                    call.push(data);
                }
            }
            Some(Err(_)) => return Ending::Aborted,
            // A stream that broke already carries its error event.
            None if body.broke() => return Ending::Cut,
            None => return Ending::Complete,
        }
    }
}

/// A member's response: the call's head (or its error), then its body from the beginning.
pub(super) async fn member_response(
    member: Member<Outcome>,
    leader: bool,
    track: &mut Track,
) -> Result<Response<ResponseBody>, ProxyError> {
    track.progress.wait();
    let outcome = member.head().await;
    track.progress.waited();
    // The call counts its tokens itself; the log line still shows them.
    track.log.tokens_counted_elsewhere();
    let head = match outcome {
        Ok(head) => head,
        Err(failed) => {
            if leader {
                track.progress = failed.progress;
            }
            return Err(failed.error);
        }
    };
    if leader {
        // The call's attempts, waits and account are the leader's own; followers made none.
        track.progress = head.progress.clone();
    }
    let mut response = Response::new(ResponseBody::shared(member));
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers.clone();
    Ok(response)
}

/// Set while a call runs: should it end any other way (a bug, or its task aborted), every member still
/// gets an answer rather than wait forever.
pub(super) struct Unfinished(Option<Arc<Call<Outcome>>>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(call) = self.0.take() {
            if std::thread::panicking() {
                tracing::error!("a shared upstream call failed; its members get an error");
            }
            let error = ProxyError::Internal("the shared upstream call ended unexpectedly".into());
            call.abandon(Err(Failed::new(error)));
        }
    }
}
