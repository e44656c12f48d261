//! The retry loop — where a 429 gets retried. Each round: admission (first tries and retries alike) →
//! one upstream attempt → its outcome, told to its lane → the policy's verdict (`policy.rs`): deliver,
//! back to the queue, back off, or give up. Every wait is bounded by the request's deadline and by the
//! end of a shutdown drain.

use std::time::Duration;

use http::Response;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::policy::{self, GiveUp, Outcome, Situation, Verdict};
use super::request::{Inspection, Outgoing};
use super::{Generation, Proxy};
use crate::admission::{Permit, Rejected, Ticket, Window};
use crate::error::ProxyError;
use crate::upstream::SendError;

/// How a request fared so far: reported in `x-sluice-attempts`, `x-sluice-queue-ms` and the log.
#[derive(Debug, Default, Clone, Copy)]
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
}

/// A retried response body is read (up to this much, for this long) so its connection can be reused.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

impl Proxy {
    /// Sends `outgoing` until the upstream gives a deliverable response (returned with the slot it holds)
    /// or the request must end with sluice's own error.
    pub(super) async fn send_with_retries(
        &self,
        generation: &Generation,
        outgoing: &Outgoing,
        seen: &Inspection,
        deadline: Instant,
        progress: &mut Progress,
    ) -> Result<(Response<Incoming>, Permit), ProxyError> {
        let config = &generation.config;
        let mut last_error: Option<SendError> = None;
        loop {
            // 1. Admission: a retry keeps its place ahead of its client's newer requests.
            let ticket = Ticket {
                model: seen.model.as_deref(),
                client: seen.client,
                priority: seen.priority,
                deadline,
                retry: progress.attempts > 0,
            };
            let waiting = Instant::now();
            let admitted = tokio::select! {
                admitted = self.admission.acquire(ticket) => admitted,
                () = self.stop.wait() => Err(Rejected::ShuttingDown),
            };
            progress.waited += waiting.elapsed();
            let mut permit = admitted.map_err(|rejected| gave_up(rejected, progress, last_error.take()))?;

            // 2. One attempt, bounded by the header timeout and the end of a drain.
            progress.attempts += 1;
            let sent = Instant::now();
            let result = tokio::select! {
                // Boxed: a queued request then carries no room for the (larger) send state.
                result = Box::pin(generation.upstream.send(outgoing.attempt())) => result,
                () = self.stop.wait() => return Err(ProxyError::ShuttingDown),
            };
            let rtt = sent.elapsed();

            // 3. Its outcome, told to the lane and the metrics.
            let outcome = match &result {
                Ok(response) => {
                    let status = response.status();
                    progress.last_status = Some(status.as_u16());
                    progress.throttled += u32::from(status == http::StatusCode::TOO_MANY_REQUESTS);
                    progress.unreachable_since = None;
                    self.metrics.attempt(status.as_str(), Some(rtt));
                    if let Some(window) = Window::from_headers(response.headers()) {
                        permit.paced(window);
                    }
                    Outcome::of_response(status, response.headers(), rtt)
                }
                Err(err) => {
                    self.metrics.attempt(err.label(), None);
                    if matches!(err, SendError::Connect(_)) {
                        progress.unreachable_since.get_or_insert(sent);
                        generation.upstream.unreachable(err);
                    }
                    Outcome::of_error(err)
                }
            };
            let on_status = &config.retry.on_status;
            if let Some(signal) = policy::signal(outcome, on_status) {
                permit.report(signal);
            }

            // 4. The verdict.
            let situation = Situation {
                on_status,
                attempts: progress.attempts,
                now: Instant::now(),
                deadline,
                unreachable_since: progress.unreachable_since,
                unreachable_wait: config.upstream.unreachable_wait,
                base_delay: config.retry.base_delay,
                max_delay: config.retry.max_delay,
            };
            let verdict = policy::decide(outcome, &situation);
            let response = match (verdict, result) {
                (Verdict::Deliver, Ok(response)) => {
                    progress.ttfb = Some(rtt);
                    return Ok((response, permit));
                }
                (Verdict::GiveUp(why), result) => {
                    drop(permit);
                    return Err(given_up(why, progress, result.err()));
                }
                (_, Ok(response)) => Some(response),
                (_, Err(err)) => {
                    last_error = Some(err);
                    None
                }
            };
            drop(permit); // the failed attempt's slot goes back before anyone waits
            if let Some(response) = response {
                last_error = None;
                Box::pin(drain(response)).await;
            }
            let delay = match verdict {
                Verdict::Requeue(reason) => {
                    self.metrics.retry(reason.as_str());
                    None
                }
                Verdict::Backoff(reason, delay) => {
                    self.metrics.retry(reason.as_str());
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
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = self.stop.wait() => return Err(ProxyError::ShuttingDown),
                }
                progress.waited += delay;
            }
        }
    }
}

/// Turns an admission rejection into the client's error. At the deadline, a request whose last attempt
/// could not reach the upstream reports that (502); otherwise the last upstream status (503).
fn gave_up(rejected: Rejected, progress: &Progress, last_error: Option<SendError>) -> ProxyError {
    match rejected {
        Rejected::QueueFull { depth, retry_after } => ProxyError::QueueFull { depth, retry_after },
        Rejected::ShuttingDown => ProxyError::ShuttingDown,
        Rejected::Internal => ProxyError::Internal("admission failed".into()),
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
        (GiveUp::Deadline, err) => gave_up(Rejected::DeadlineExceeded { retry_after: 1 }, progress, err),
    }
}

/// Reads what is left of a response that will not be delivered, briefly, so the connection can be reused.
async fn drain(response: Response<Incoming>) {
    let body = Limited::new(response.into_body(), DRAIN_LIMIT);
    let _ = tokio::time::timeout(DRAIN_TIME, body.collect()).await;
}
