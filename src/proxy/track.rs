//! What is tracked about one request along its path: its id, its log record, how it fared so far, what
//! the cache did with it — and, should it be dropped before it was answered, its count as `cancelled`.

use std::sync::Arc;

use http::header::HeaderValue;

use super::attempts::Progress;
use super::millis;
use crate::observe::{Metrics, RequestLog};

/// What is tracked about one request along its path. Dropped before it was answered — the client went
/// away while the request waited or backed off — it records the outcome `cancelled`.
pub(super) struct Track {
    pub request_id: HeaderValue,
    pub log: RequestLog,
    pub progress: Progress,
    /// Set until the request is answered.
    pub metrics: Option<Arc<Metrics>>,
    /// What the cache did with it (`x-sluice-cache`), when the cache is on.
    pub cache: Option<&'static str>,
}

impl Track {
    /// Counts the request's outcome once it has its response.
    pub fn answered(&mut self, outcome: &'static str) {
        self.log.outcome = outcome;
        if let Some(metrics) = self.metrics.take() {
            let progress = &self.progress;
            let (model, client) = (&self.log.model_label, &*self.log.client_name);
            metrics.request_answered(outcome, model, client, progress.waited, progress.throttled);
        }
    }

    pub fn into_parts(mut self) -> (HeaderValue, RequestLog, Progress) {
        self.metrics = None;
        let log = std::mem::replace(&mut self.log, RequestLog::detached());
        (self.request_id.clone(), log, std::mem::take(&mut self.progress))
    }
}

impl Drop for Track {
    fn drop(&mut self) {
        if self.metrics.is_some() {
            // Dropped while unwinding: a bug inside sluice (the server answers 500), not the client.
            let outcome = if std::thread::panicking() { "internal_error" } else { "cancelled" };
            self.progress.waited = self.progress.waited_so_far();
            self.progress.waiting_since = None;
            self.answered(outcome);
            self.log.cancelled(outcome, millis(self.progress.waited), self.progress.attempts);
        }
    }
}

/// Writes how the request fared into its log record (at the response head; for a head sent early, when
/// the request settles).
pub(super) fn record(log: &mut RequestLog, progress: &Progress) {
    log.attempts = progress.attempts;
    log.queue_ms = millis(progress.waited);
    log.upstream_status = progress.last_status;
    log.ttfb_ms = progress.ttfb.map(millis);
    log.account = progress.account.clone();
    log.upstream = progress.upstream.clone();
}

/// The outcome counted for a response of `status` (sluice's own errors have theirs).
pub(super) fn outcome_of(status: u16) -> &'static str {
    match status {
        500.. => "upstream_error",
        400.. => "client_error",
        _ => "success",
    }
}
