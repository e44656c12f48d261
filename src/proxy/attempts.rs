//! The retry loop — where a 429 gets retried. Each round: admission (first tries and retries alike) →
//! one upstream attempt → its outcome, told to its lane → the policy's verdict (`policy.rs`): deliver,
//! back to the queue, back off, or give up. Every wait is bounded by the request's deadline and by the
//! end of a shutdown drain.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use super::circuit::Start;
use super::policy::{self, GiveUp, Outcome, Situation, Verdict};
use super::request::{Inspection, Outgoing};
use super::retry::RetryReason;
use super::{deliver, fallback};
use super::{Generation, Proxy};
use crate::admission::{Permit, Rejected, Ticket, Window};
use crate::error::ProxyError;
use crate::upstream::accounts::{Accounts, Refusal, Setback};
use crate::upstream::{SendError, UpstreamBody};

/// How a request fared so far: reported in `x-sluice-attempts`, `x-sluice-queue-ms` and the log.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// Upstream attempts made.
    pub attempts: u32,
    /// Time spent waiting for admission and in backoff.
    pub waited: Duration,
    /// The status of the last upstream response (retried or delivered).
    pub last_status: Option<u16>,
    /// Attempts answered 429 (absorbed, if the request then succeeds).
    pub throttled: u32,
    /// Time to the delivered response's headers.
    pub ttfb: Option<Duration>,
    /// When the request's current run of connection failures began.
    pub unreachable_since: Option<Instant>,
    /// The account that answered (the delivered attempt's).
    pub account: Option<std::sync::Arc<str>>,
    /// The model that answered (a fallback's may differ from the one asked for).
    pub model: Option<std::sync::Arc<str>>,
    /// The upstream that answered (`primary` or a fallback's name).
    pub upstream: Option<std::sync::Arc<str>>,
    /// Times the request moved on to a fallback.
    pub fallbacks: u32,
    /// Its place in the queue while it waits, for a request that tells it (the keep-alive comments).
    pub entry: Option<Arc<crate::admission::Entry>>,
    /// Set while the request waits (in the queue or backing off): since when. A request abandoned then
    /// counts this wait too.
    pub waiting_since: Option<Instant>,
}

impl Progress {
    /// Begins a wait.
    pub(super) fn wait(&mut self) {
        self.waiting_since = Some(Instant::now());
    }

    /// Ends a wait, counting it.
    pub(super) fn waited(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += since.elapsed();
        }
    }

    /// All the time waited so far, a wait in progress included.
    pub fn waited_so_far(&self) -> Duration {
        self.waited + self.waiting_since.map_or(Duration::ZERO, |since| since.elapsed())
    }
}

/// A retried response body is read (up to this much, for this long) so its connection can be reused;
/// a refusal's body is kept (to answer with when no account can serve).
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// A deliverable response: the slot it holds, what of its body was read already (`deliver.rs`), and
/// the target that answered.
pub struct Sent {
    pub response: Response<UpstreamBody>,
    pub permit: Permit,
    /// Body bytes already read, to come before the rest.
    pub prefix: Vec<Bytes>,
    /// The prefix is the whole body.
    pub complete: bool,
    /// Which of the generation's targets answered.
    pub target: usize,
}

/// Where a request stands on its current target (the primary, or a fallback).
struct Leg<'a> {
    index: usize,
    outgoing: LegRequest<'a>,
    /// The model asked for there.
    model: Option<String>,
    since: Instant,
    /// Attempts in a row that failed on it.
    failures: u32,
    /// Keeps waiting past `fallback.after`: its lane was busy, not throttled.
    patient: bool,
}

/// The request as a leg's target gets it: the client's own on the primary, a retargeted copy on a
/// fallback — boxed, so that a request waiting for admission carries no room for a copy it rarely needs.
enum LegRequest<'a> {
    Primary(&'a Outgoing),
    Fallback(Box<Outgoing>),
}

impl std::ops::Deref for LegRequest<'_> {
    type Target = Outgoing;

    fn deref(&self) -> &Outgoing {
        match self {
            Self::Primary(outgoing) => outgoing,
            Self::Fallback(outgoing) => outgoing,
        }
    }
}

impl Proxy {
    /// Sends `outgoing` until an upstream gives a deliverable response (returned with the slot it holds)
    /// or the request must end with sluice's own error. It starts on the primary (or, while the primary's
    /// circuit is open, the first fallback) and moves on to the next target as `fallback.rs` says. With
    /// `only`, it stays on that one target.
    pub(super) async fn send_with_retries(
        &self,
        generation: &Generation,
        outgoing: &Outgoing,
        seen: &Inspection,
        deadline: Instant,
        progress: &mut Progress,
        only: Option<usize>,
    ) -> Result<Sent, ProxyError> {
        let config = &generation.config;
        let accounts = &generation.accounts;
        let keyed = accounts.keyed();
        let targets = &generation.targets;
        // Only completions fall back: the balance, the model list and other APIs are the primary's own.
        let fallbacks = only.is_none() && targets.len() > 1 && fallback::completions(outgoing.path());
        // While the primary's circuit is open, requests start on the first fallback; one probes it.
        let mut probe = None;
        let first = match only {
            Some(index) => index,
            None if fallbacks => match self.circuit().start(Instant::now()) {
                Start::Fallback => 1,
                Start::Probe => {
                    probe = Some(Probe { proxy: self, reported: false });
                    0
                }
                Start::Primary => 0,
            },
            None => 0,
        };
        let mut leg = leg(generation, outgoing, seen, first)?;
        let mut last_error: Option<SendError> = None;
        loop {
            let target = &targets[leg.index];
            let has_next = fallbacks && leg.index + 1 < targets.len();
            let on_primary = fallbacks && leg.index == 0;
            progress.upstream = Some(target.name.clone());
            if leg.index > 0 {
                probe = None; // it left the primary without an answer either way: another may probe
            }
            // 1. Admission: a retry keeps its place ahead of its client's newer requests. While the upstream
            //    cannot be reached, no request waits longer than `unreachable_wait` for it; with a fallback
            //    to go to, none waits longer than `fallback.after` for a throttled lane.
            let now = Instant::now();
            let unreachable = target.upstream.unreachable_since().is_some();
            let wait_bound = now.checked_add(config.upstream.unreachable_wait).unwrap_or(deadline);
            let after = leg.since.checked_add(config.fallback.after).unwrap_or(deadline);
            let mut ticket_deadline = if unreachable { deadline.min(wait_bound) } else { deadline };
            if has_next && !leg.patient {
                ticket_deadline = ticket_deadline.min(after);
            }
            let model = leg.model.as_deref().or(seen.model.as_deref());
            let entry = progress.entry.clone();
            let ticket = Ticket {
                model,
                pool: target.pool.as_deref(),
                client: seen.client,
                priority: seen.priority,
                deadline: ticket_deadline,
                retry: progress.attempts > 0,
                entry: entry.as_deref(),
            };
            progress.wait();
            let admitted = tokio::select! {
                admitted = self.admission.acquire(ticket) => admitted,
                () = self.stop.wait() => Err(Rejected::ShuttingDown),
            };
            progress.waited();
            let now = Instant::now();
            let pool = target.pool.as_deref();
            let admitted = match admitted {
                Err(Rejected::DeadlineExceeded { .. })
                    if has_next && !leg.patient && now >= after && now < deadline =>
                {
                    if progress.throttled > 0 || self.admission.throttled(model, pool) {
                        leg = self.next_leg(generation, outgoing, seen, &leg, "throttled", progress)?;
                    } else {
                        leg.patient = true; // a busy lane, not a throttled one: it waits on
                    }
                    continue;
                }
                Err(Rejected::DeadlineExceeded { .. }) if has_next && unreachable && now < deadline => {
                    leg = self.next_leg(generation, outgoing, seen, &leg, "unreachable", progress)?;
                    continue;
                }
                Err(Rejected::NoAccount) if has_next => {
                    leg = self.next_leg(generation, outgoing, seen, &leg, "no_account", progress)?;
                    continue;
                }
                Err(Rejected::Unreachable) if has_next && now < deadline => {
                    leg = self.next_leg(generation, outgoing, seen, &leg, "unreachable", progress)?;
                    continue;
                }
                Err(Rejected::DeadlineExceeded { .. }) if target.upstream.unreachable_since().is_some() => {
                    // Everyone else waiting for this upstream has waited long enough too.
                    self.admission.fail_waiting(pool);
                    Err(Rejected::Unreachable)
                }
                other => other,
            };
            let mut permit = admitted.map_err(|rejected| gave_up(rejected, progress, last_error.take(), accounts))?;
            // The account's key for this attempt (none: the client's own passes through). An account whose
            // last key went meanwhile serves no more.
            let key = accounts.key(permit.account());
            if key.is_none() && accounts.keyed_account(permit.account()) {
                self.admission.set_account_enabled(permit.account(), false);
                continue;
            }
            let (key_index, key) = key.unzip();

            // 2–4, an attempt and its outcome, in a future of their own, boxed: a request waiting for
            // admission above carries no room for them. `None`: round again (a retry, or the next leg).
            let turn: Result<Option<Sent>, ProxyError> = Box::pin(async {
                // 2. One attempt, bounded by the header timeout and the end of a drain.
                progress.attempts += 1;
                let sent = Instant::now();
                let result = tokio::select! {
                    // Boxed: a queued request then carries no room for the (larger) send state.
                    result = Box::pin(target.upstream.send(leg.outgoing.attempt(key.as_ref()))) => result,
                    () = self.stop.wait() => return Err(ProxyError::ShuttingDown),
                };
                let rtt = sent.elapsed();

                // 3. Its outcome, told to the lane, the circuit and the metrics.
                let outcome = match &result {
                    Ok(response) => {
                        let status = response.status();
                        progress.last_status = Some(status.as_u16());
                        progress.throttled += u32::from(status == http::StatusCode::TOO_MANY_REQUESTS);
                        progress.unreachable_since = None;
                        target.upstream.reached();
                        self.metrics.attempt(status.as_str(), permit.account(), Some(rtt));
                        if let Some(window) = Window::from_headers(response.headers()) {
                            permit.paced(window);
                        }
                        Outcome::of_response(status, response.headers(), rtt)
                    }
                    Err(err) => {
                        self.metrics.attempt(err.label(), permit.account(), None);
                        if matches!(err, SendError::Connect(_)) {
                            progress.unreachable_since.get_or_insert(sent);
                            target.upstream.unreachable(err);
                        }
                        Outcome::of_error(err)
                    }
                };
                let on_status = &config.retry.on_status;
                if let Some(signal) = policy::signal(outcome, on_status) {
                    permit.report(signal);
                }
                // The circuit hears of the primary's answer — a deliverable one once its start was read.
                let circuit = policy::circuit_failure(outcome, on_status).filter(|_| on_primary);

                // 4. The verdict; a deliverable response's start is read first (`deliver.rs`).
                let situation = Situation {
                    on_status,
                    keyed,
                    attempts: progress.attempts,
                    now: Instant::now(),
                    deadline,
                    unreachable_since: progress.unreachable_since,
                    unreachable_wait: config.upstream.unreachable_wait,
                    base_delay: config.retry.base_delay,
                    max_delay: config.retry.max_delay,
                };
                let verdict = policy::decide(outcome, &situation);
                if verdict != Verdict::Deliver {
                    self.tell_circuit(circuit, &mut probe);
                }
                let (verdict, result) = match (verdict, result) {
                    (Verdict::Deliver, Ok(response)) => {
                        let first_token = (has_next && seen.stream).then_some(config.fallback.first_token_timeout);
                        // Boxed too: its state is the largest of this loop's.
                        let starting = Box::pin(deliver::start(response, first_token, config.upstream.idle_timeout));
                        let start = tokio::select! {
                            start = starting => start,
                            () = self.stop.wait() => return Err(ProxyError::ShuttingDown),
                        };
                        match start {
                            deliver::Start::Deliver { response, prefix, complete } => {
                                self.tell_circuit(circuit, &mut probe);
                                progress.ttfb = Some(rtt);
                                progress.account = Some(Arc::from(permit.account()));
                                progress.model = Some(Arc::from(permit.model()));
                                return Ok(Some(Sent { response, permit, prefix, complete, target: leg.index }));
                            }
                            deliver::Start::Redo(why) => {
                                self.tell_circuit(circuit.map(|_| true), &mut probe);
                                if why == deliver::Redo::FirstToken && has_next {
                                    drop(permit);
                                    leg = self.next_leg(generation, outgoing, seen, &leg, "first_token", progress)?;
                                    return Ok(None);
                                }
                                (policy::decide(Outcome::Reset, &situation), Err(SendError::BodyCut))
                            }
                        }
                    }
                    (verdict, result) => (verdict, result),
                };
                let response = match (verdict, result) {
                    (Verdict::GiveUp(GiveUp::HeaderTimeout), _) if has_next && config.fallback.on_header_timeout => {
                        drop(permit);
                        leg = self.next_leg(generation, outgoing, seen, &leg, "header_timeout", progress)?;
                        return Ok(None);
                    }
                    (Verdict::GiveUp(GiveUp::Unreachable), _) if has_next => {
                        drop(permit);
                        leg = self.next_leg(generation, outgoing, seen, &leg, "unreachable", progress)?;
                        return Ok(None);
                    }
                    (Verdict::GiveUp(why), result) => {
                        drop(permit);
                        if why == GiveUp::Unreachable {
                            // Everyone else waiting for this upstream has waited long enough too.
                            self.admission.fail_waiting(target.pool.as_deref());
                        }
                        return Err(given_up(why, progress, result.err()));
                    }
                    (_, Ok(response)) => Some(response),
                    (_, Err(err)) => {
                        last_error = Some(err);
                        None
                    }
                };
                let account: Arc<str> = Arc::from(permit.account());
                drop(permit); // the failed attempt's slot goes back before anyone waits
                if let Some(response) = response {
                    last_error = None;
                    let refusal = Box::pin(drain(response)).await;
                    if let Verdict::Requeue(reason @ (RetryReason::KeyRefused | RetryReason::OutOfBalance)) = verdict {
                        let out = match reason {
                            RetryReason::KeyRefused => accounts.key_refused(&account, key_index.unwrap_or(0), refusal),
                            _ => {
                                accounts.out_of_balance(&account, refusal);
                                Setback::AccountOut
                            }
                        };
                        if out == Setback::AccountOut {
                            self.admission.set_account_enabled(&account, false);
                        }
                    }
                }
                let delay = match verdict {
                    Verdict::Requeue(reason) => {
                        self.metrics.retry(reason.as_str());
                        if matches!(reason, RetryReason::Throttled | RetryReason::Overloaded) {
                            leg.patient = false; // throttled now: `fallback.after` counts again
                        }
                        None
                    }
                    Verdict::Backoff(reason, delay) => {
                        self.metrics.retry(reason.as_str());
                        leg.failures += 1;
                        if leg.failures >= fallback::PERSISTENT && has_next {
                            leg = self.next_leg(generation, outgoing, seen, &leg, "failing", progress)?;
                            return Ok(None);
                        }
                        Some(delay)
                    }
                    Verdict::Deliver | Verdict::GiveUp(_) => None,
                };
                tracing::debug!(
                    attempt = progress.attempts,
                    status = progress.last_status,
                    delay_ms = delay.map(|d| d.as_millis() as u64),
                    "retrying upstream request"
                );
                if let Some(delay) = delay {
                    progress.wait();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.stop.wait() => return Err(ProxyError::ShuttingDown),
                    }
                    progress.waited();
                }
                Ok(None)
            })
            .await;
            if let Some(sent) = turn? {
                return Ok(sent);
            }
        }
    }

    /// Tells the primary's circuit what its attempt came to (`Some(true)`: a failure); a probe that
    /// reported is done.
    fn tell_circuit(&self, failure: Option<bool>, probe: &mut Option<Probe<'_>>) {
        let Some(failure) = failure else { return };
        if failure {
            self.circuit().failure(Instant::now());
        } else {
            self.circuit().success();
        }
        if let Some(mut probe) = probe.take() {
            probe.reported = true;
        }
    }

    /// Moves a request from its leg's target to the next one, saying so.
    fn next_leg<'a>(
        &self,
        generation: &Generation,
        outgoing: &'a Outgoing,
        seen: &Inspection,
        from: &Leg<'_>,
        why: &'static str,
        progress: &mut Progress,
    ) -> Result<Leg<'a>, ProxyError> {
        let next = leg(generation, outgoing, seen, from.index + 1)?;
        let (from_name, to_name) = (&generation.targets[from.index].name, &generation.targets[next.index].name);
        tracing::info!(from = %from_name, to = %to_name, why, "falling back to the next upstream");
        self.metrics.fallback(from_name, to_name, why);
        progress.fallbacks += 1;
        Ok(next)
    }
}

/// A request probing the primary's open circuit. Should it leave the primary without an answer either
/// way (moved on, its client gone, a 429 only its lane hears of), the circuit may probe again at once.
struct Probe<'a> {
    proxy: &'a Proxy,
    reported: bool,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.proxy.circuit().probe_lost(Instant::now());
        }
    }
}

/// The request as target `index` gets it.
pub(super) fn retargeted(
    generation: &Generation,
    outgoing: &Outgoing,
    seen: &Inspection,
    index: usize,
) -> Result<Outgoing, ProxyError> {
    Ok(match leg(generation, outgoing, seen, index)?.outgoing {
        LegRequest::Primary(outgoing) => outgoing.clone(),
        LegRequest::Fallback(outgoing) => *outgoing,
    })
}

/// A request's leg on target `index`: the request retargeted there (the primary's is the original).
fn leg<'a>(
    generation: &Generation,
    outgoing: &'a Outgoing,
    seen: &Inspection,
    index: usize,
) -> Result<Leg<'a>, ProxyError> {
    let target = &generation.targets[index];
    let model = seen.model.as_deref().and_then(|m| target.model_for(m)).map(str::to_string);
    let outgoing = if index == 0 {
        LegRequest::Primary(outgoing)
    } else {
        LegRequest::Fallback(Box::new(outgoing.retarget(&target.upstream, model.as_deref())?))
    };
    Ok(Leg { index, outgoing, model, since: Instant::now(), failures: 0, patient: false })
}

/// Turns an admission rejection into the client's error. At the deadline, a request whose last attempt
/// could not reach the upstream reports that (502); otherwise the last upstream status (503). When no
/// account can serve, the upstream's own refusal (its 401 or 402) is the answer.
fn gave_up(rejected: Rejected, progress: &Progress, last_error: Option<SendError>, accounts: &Accounts) -> ProxyError {
    match rejected {
        Rejected::QueueFull { depth, retry_after } => ProxyError::QueueFull { depth, retry_after },
        Rejected::ClientQueueFull { queued } => ProxyError::ClientQueueFull { queued },
        Rejected::ShuttingDown => ProxyError::ShuttingDown,
        Rejected::Internal => ProxyError::Internal("admission failed".into()),
        Rejected::NoAccount => accounts.refusal().map_or(ProxyError::NoAccount, ProxyError::Refused),
        Rejected::Unreachable => ProxyError::UpstreamUnreachable(match last_error {
            Some(err) => format!("{err} (gave up after {} attempts)", progress.attempts),
            None => "no connection for upstream.unreachable_wait".into(),
        }),
        Rejected::DeadlineExceeded { retry_after } => match last_error {
            Some(err) => {
                ProxyError::UpstreamUnreachable(format!("{err} (gave up after {} attempts)", progress.attempts))
            }
            None => ProxyError::DeadlineExceeded {
                waited: progress.waited,
                attempts: progress.attempts,
                last_status: progress.last_status,
                retry_after,
            },
        },
    }
}

/// The client's error when the policy gives up.
fn given_up(why: GiveUp, progress: &Progress, last_error: Option<SendError>) -> ProxyError {
    match (why, last_error) {
        (GiveUp::HeaderTimeout, Some(SendError::HeaderTimeout(waited))) => ProxyError::UpstreamTimeout(waited),
        (GiveUp::HeaderTimeout, _) => ProxyError::UpstreamTimeout(Duration::ZERO),
        (GiveUp::Unreachable, err) => ProxyError::UpstreamUnreachable(format!(
            "{} (gave up after {} attempts)",
            err.map_or_else(|| "no connection".to_string(), |e| e.to_string()),
            progress.attempts
        )),
        (GiveUp::Deadline, Some(err)) => {
            ProxyError::UpstreamUnreachable(format!("{err} (gave up after {} attempts)", progress.attempts))
        }
        (GiveUp::Deadline, None) => ProxyError::DeadlineExceeded {
            waited: progress.waited,
            attempts: progress.attempts,
            last_status: progress.last_status,
            retry_after: 1,
        },
    }
}

/// Reads what is left of a response that will not be delivered, briefly, so the connection can be reused;
/// returns it as a refusal (what a 401 or 402 said).
async fn drain(response: Response<UpstreamBody>) -> Refusal {
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, DRAIN_LIMIT);
    let bytes = match tokio::time::timeout(DRAIN_TIME, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => bytes::Bytes::new(),
    };
    Refusal { status: parts.status, content_type: parts.headers.get(http::header::CONTENT_TYPE).cloned(), body: bytes }
}
