//! The retry loop — where a 429 gets retried. Every attempt passes admission, is sent upstream and is
//! classified; a retry waits (the shared cooldown for throttles, its own jittered backoff otherwise, never
//! less than the upstream's Retry-After) until the request gets a deliverable response or its deadline passes.

use std::time::Duration;

use http::Response;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::request::{Inspection, Outgoing};
use super::retry::{self, Decision};
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
        let retry_config = &generation.config.retry;
        let mut last_connection_error: Option<SendError> = None;
        loop {
            // Admission: first attempts and retries alike; a retry keeps its place ahead of newer requests.
            let ticket = Ticket {
                model: seen.model.as_deref(),
                client: seen.client,
                priority: seen.priority,
                deadline,
                retry: progress.attempts > 0,
            };
            let waiting = Instant::now();
            let admitted = self.admission.acquire(ticket).await;
            progress.waited += waiting.elapsed();
            let mut permit = admitted.map_err(|rejected| gave_up(rejected, progress, last_connection_error.take()))?;

            // One upstream attempt, classified.
            progress.attempts += 1;
            let sent = Instant::now();
            // Boxed: a queued request then carries no room for the (larger) send state.
            let outcome = Box::pin(generation.upstream.send(outgoing.attempt())).await;
            let ttfb = sent.elapsed();
            let decision = match &outcome {
                Ok(response) => {
                    progress.last_status = Some(response.status().as_u16());
                    progress.throttled += u32::from(response.status() == http::StatusCode::TOO_MANY_REQUESTS);
                    self.metrics.attempt(response.status().as_str(), Some(ttfb));
                    retry::classify_status(response.status(), response.headers(), &retry_config.on_status)
                }
                Err(err) => {
                    self.metrics.attempt(err.label(), None);
                    retry::classify_error(err)
                }
            };
            if let Some(window) = outcome.as_ref().ok().and_then(|r| Window::from_headers(r.headers())) {
                permit.paced(window);
            }
            let (reason, retry_after) = match (decision, outcome) {
                (Decision::Retry { reason, retry_after }, outcome) => {
                    if reason.pauses_everyone() {
                        permit.throttled(retry_after);
                    }
                    drop(permit); // the failed attempt's slot goes back before anyone waits
                    match outcome {
                        Ok(response) => {
                            last_connection_error = None;
                            Box::pin(drain(response)).await;
                        }
                        Err(err) => last_connection_error = Some(err),
                    }
                    (reason, retry_after)
                }
                (_, Ok(response)) => {
                    progress.ttfb = Some(ttfb);
                    if response.status().is_success() {
                        permit.succeeded(ttfb);
                    }
                    return Ok((response, permit));
                }
                (_, Err(SendError::HeaderTimeout(waited))) => return Err(ProxyError::UpstreamTimeout(waited)),
                (_, Err(err)) => return Err(ProxyError::UpstreamUnreachable(err.to_string())),
            };

            // Backoff: every retry waits its own jittered backoff, never less than the upstream's
            // Retry-After, so a throttled request cannot spin. A throttle also slowed everyone down above
            // (`permit.throttled`): the model's learned limit dropped, or without one, all dispatch pauses.
            let floor = retry_after.unwrap_or_default().min(retry_config.max_delay);
            let delay = retry::backoff(progress.attempts, retry_config.base_delay, retry_config.max_delay).max(floor);
            self.metrics.retry(reason.as_str());
            tracing::debug!(
                attempt = progress.attempts,
                reason = reason.as_str(),
                status = progress.last_status,
                delay_ms = delay.as_millis() as u64,
                "retrying upstream request"
            );
            if Instant::now() + delay >= deadline {
                let retry_after = delay.as_secs().max(1);
                return Err(gave_up(Rejected::DeadlineExceeded { retry_after }, progress, last_connection_error));
            }
            tokio::time::sleep(delay).await;
            progress.waited += delay;
        }
    }
}

/// Turns an admission rejection into the client's error. At the deadline, a request whose last attempt
/// could not reach the upstream reports that (502); otherwise the last upstream status (503).
fn gave_up(rejected: Rejected, progress: &Progress, last_connection_error: Option<SendError>) -> ProxyError {
    match rejected {
        Rejected::QueueFull { depth, retry_after } => ProxyError::QueueFull { depth, retry_after },
        Rejected::ShuttingDown => ProxyError::ShuttingDown,
        Rejected::DeadlineExceeded { retry_after } => match last_connection_error {
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

/// Reads what is left of a response that will not be delivered, briefly, so the connection can be reused.
async fn drain(response: Response<Incoming>) {
    let body = Limited::new(response.into_body(), DRAIN_LIMIT);
    let _ = tokio::time::timeout(DRAIN_TIME, body.collect()).await;
}
