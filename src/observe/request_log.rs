//! The record of one request, completed along its path and closed when its response body ends or is
//! dropped: then it records the end-of-response metrics (duration, tokens read from the body's tail,
//! broken streams) and hands its one log line (never keys, never bodies) to the log writer (`log.rs`).

use std::sync::Arc;

use http::Method;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::usage::{count_events, estimate_tokens, UsageTail};

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every byte reached the client.
    Complete,
    /// The client went away before the end.
    ClientGone,
    /// The upstream broke or stalled mid-way (SSE got an error event, other bodies were aborted).
    UpstreamBroken,
}

/// The client name of every caller that is no configured client, allocated once.
fn anonymous() -> Arc<str> {
    static ANONYMOUS: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(crate::config::ANONYMOUS));
    ANONYMOUS.clone()
}

/// What is known about a request.
#[derive(Debug)]
pub struct RequestLog {
    pub request_id: String,
    pub method: Method,
    /// The path without its query string (a query may carry things that do not belong in logs).
    pub path: String,
    pub status: u16,
    /// The model as the request named it.
    pub model: Option<Arc<str>>,
    /// The bounded metrics label for the model.
    pub model_label: String,
    /// The account that answered (a configured name).
    pub account: Option<Arc<str>>,
    /// The upstream that answered (`primary` or a fallback's name).
    pub upstream: Option<Arc<str>>,
    pub stream: bool,
    /// A hash of the client identity used for fair queueing (never the token itself).
    pub client: u64,
    /// The configured client's name, or `anonymous`.
    pub client_name: std::sync::Arc<str>,
    pub attempts: u32,
    pub queue_ms: u64,
    /// The status of the last upstream response, whether or not it was delivered.
    pub upstream_status: Option<u16>,
    /// Time to the delivered upstream response's headers.
    pub ttfb_ms: Option<u64>,
    /// The `type` of sluice's own error, when it answered with one.
    pub error: Option<&'static str>,
    /// The request's outcome (`sluice_requests_total{outcome}`).
    pub outcome: &'static str,
    /// What the cache did with it (`x-sluice-cache`), or "-".
    pub cache: &'static str,
    started: Instant,
    /// A placeholder that writes nothing.
    silent: bool,
    bytes: u64,
    end: End,
    /// Set for upstream bodies: the tail where `usage` is looked for.
    usage: Option<UsageTail>,
    metrics: Option<Arc<Metrics>>,
    /// Told the tokens the response used (a configured client's daily count).
    charge: Option<Charge>,
    /// False when another place counts this response's tokens (a call shared by identical requests).
    count_tokens: bool,
    /// The request body's size (for a token estimate when the response reports no usage).
    pub request_bytes: u64,
    /// Stream events sent (likewise).
    events: u64,
}

/// Where a response's tokens (prompt + completion) are charged.
pub struct Charge(pub Box<dyn FnOnce(u64) + Send + Sync>);

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Charge")
    }
}

impl RequestLog {
    /// Starts the record of a request that arrived at `started`.
    pub fn new(request_id: String, method: Method, path: &str, started: Instant) -> Self {
        Self {
            request_id,
            method,
            path: path.to_owned(),
            status: 0,
            model: None,
            model_label: crate::admission::UNKNOWN_MODEL.to_string(),
            account: None,
            upstream: None,
            stream: false,
            client: 0,
            client_name: anonymous(),
            attempts: 0,
            queue_ms: 0,
            upstream_status: None,
            ttfb_ms: None,
            error: None,
            outcome: "-",
            cache: "-",
            started,
            silent: false,
            bytes: 0,
            end: End::ClientGone,
            usage: None,
            metrics: None,
            charge: None,
            count_tokens: true,
            request_bytes: 0,
            events: 0,
        }
    }

    /// A record that writes nothing (what is left behind when the real one moves on).
    pub fn detached() -> Self {
        let mut log = Self::new(String::new(), Method::GET, "", Instant::now());
        log.silent = true;
        log
    }

    /// The request ended without an answer: the client went away while it waited (`cancelled`), or a bug
    /// ended it (`internal_error`).
    pub fn cancelled(&mut self, outcome: &'static str, queue_ms: u64, attempts: u32) {
        self.outcome = outcome;
        self.queue_ms = queue_ms;
        self.attempts = attempts;
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records the end-of-response metrics to `metrics`, reading token usage from the body if asked.
    pub fn report_to(&mut self, metrics: Arc<Metrics>, read_usage: bool) {
        self.metrics = Some(metrics);
        self.usage = read_usage.then(UsageTail::default);
    }

    /// Reads the usage from the bytes sent from now on (a stream whose head went out early: its upstream
    /// part begins here).
    pub fn read_usage(&mut self) {
        self.usage.get_or_insert_with(UsageTail::default);
    }

    /// Charges the response's tokens, once known, to `charge`.
    pub fn charge_to(&mut self, charge: Charge) {
        self.charge = Some(charge);
    }

    /// Hands over where the tokens are charged (to the shared call that counts them instead).
    pub fn take_charge(&mut self) -> Option<Charge> {
        self.charge.take()
    }

    /// The response's tokens are counted elsewhere (its shared call): the log line still shows them.
    pub fn tokens_counted_elsewhere(&mut self) {
        self.count_tokens = false;
        self.charge = None;
    }

    /// Counts a chunk sent to the client (and keeps its end for `usage`).
    pub fn sent(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        if let Some(tail) = &mut self.usage {
            tail.observe(chunk);
            if self.stream {
                self.events += count_events(chunk);
            }
        }
    }

    /// Records how the body ended (the first word stands).
    pub fn end(&mut self, end: End) {
        if self.end == End::ClientGone {
            self.end = end;
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if self.silent {
            return;
        }
        let usage = self.usage.as_ref().and_then(UsageTail::usage);
        let duration = self.started.elapsed();
        if let Some(metrics) = &self.metrics {
            let model = &self.model_label;
            let account = self.account.as_deref().unwrap_or("none");
            let client = &*self.client_name;
            let counted = usage.filter(|_| self.count_tokens);
            metrics.response_finished(duration, model, (account, client), counted, self.end == End::UpstreamBroken);
        }
        // A quota is charged the usage; without one (left out, or cut short), an estimate — never nothing.
        if let (Some(charge), true) = (self.charge.take(), self.usage.is_some()) {
            let tokens = usage.map_or_else(
                || estimate_tokens(self.request_bytes, self.bytes, self.events, self.stream),
                |u| u.prompt_tokens.saturating_add(u.completion_tokens),
            );
            (charge.0)(tokens);
        }
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let line = RequestLine {
            request_id: std::mem::take(&mut self.request_id),
            method: std::mem::replace(&mut self.method, Method::GET),
            path: cut(std::mem::take(&mut self.path), MAX_LOGGED_PATH),
            status: self.status,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            bytes: self.bytes,
            end: self.end,
            outcome: self.outcome,
            cache: self.cache,
            model: self.model.take().map(|model| {
                if model.len() > MAX_LOGGED_MODEL {
                    Arc::from(cut(model.to_string(), MAX_LOGGED_MODEL))
                } else {
                    model
                }
            }),
            account: self.account.take(),
            upstream: self.upstream.take(),
            stream: self.stream,
            client: self.client,
            client_name: self.client_name.clone(),
            attempts: self.attempts,
            queue_ms: self.queue_ms,
            upstream_status: self.upstream_status,
            ttfb_ms: self.ttfb_ms,
            usage,
            error: self.error,
        };
        super::log::write_request_line(line);
    }
}

/// The longest path and model name a log line carries (a client may send far longer ones); the rest is
/// cut and marked with `…`.
const MAX_LOGGED_PATH: usize = 1024;
const MAX_LOGGED_MODEL: usize = 128;

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let end = (0..=max).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The finished record's fields, owned: formatted and written by the log writer thread (`log.rs`).
#[derive(Debug)]
pub struct RequestLine {
    pub(super) request_id: String,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) status: u16,
    pub(super) duration_ms: u64,
    pub(super) bytes: u64,
    pub(super) end: End,
    pub(super) outcome: &'static str,
    pub(super) cache: &'static str,
    pub(super) model: Option<Arc<str>>,
    pub(super) account: Option<Arc<str>>,
    pub(super) upstream: Option<Arc<str>>,
    pub(super) stream: bool,
    pub(super) client: u64,
    pub(super) client_name: Arc<str>,
    pub(super) attempts: u32,
    pub(super) queue_ms: u64,
    pub(super) upstream_status: Option<u16>,
    pub(super) ttfb_ms: Option<u64>,
    pub(super) usage: Option<super::usage::Usage>,
    pub(super) error: Option<&'static str>,
}

impl RequestLine {
    #[cfg(test)]
    pub(super) fn sample() -> Self {
        Self {
            request_id: "r".into(),
            method: Method::POST,
            path: "/v1/chat/completions".into(),
            status: 200,
            duration_ms: 1,
            bytes: 2,
            end: End::Complete,
            outcome: "ok",
            cache: "-",
            model: None,
            account: None,
            upstream: None,
            stream: false,
            client: 3,
            client_name: anonymous(),
            attempts: 1,
            queue_ms: 0,
            upstream_status: Some(200),
            ttfb_ms: Some(1),
            usage: None,
            error: None,
        }
    }

    pub(super) fn end(&self) -> &'static str {
        match self.end {
            End::Complete => "complete",
            End::ClientGone => "client_gone",
            End::UpstreamBroken => "upstream_broken",
        }
    }

    /// The target of the line's event (this module), which the log's level filters on.
    pub(super) const TARGET: &'static str = module_path!();

    /// Whether the log takes the line (`log.level` lets this module's info through).
    pub(super) fn enabled() -> bool {
        tracing::enabled!(tracing::Level::INFO)
    }

    /// Writes the line at info through tracing (never keys, never bodies).
    pub(super) fn emit(&self) {
        let end = self.end();
        tracing::info!(
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            status = self.status,
            duration_ms = self.duration_ms,
            bytes = self.bytes,
            end,
            outcome = self.outcome,
            cache = self.cache,
            model = self.model.as_deref().unwrap_or("-"),
            account = self.account.as_deref().unwrap_or("-"),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            stream = self.stream,
            client = format_args!("{:016x}", self.client),
            client_name = &*self.client_name,
            attempts = self.attempts,
            queue_ms = self.queue_ms,
            upstream_status = self.upstream_status,
            ttfb_ms = self.ttfb_ms,
            prompt_tokens = self.usage.map(|u| u.prompt_tokens),
            completion_tokens = self.usage.map(|u| u.completion_tokens),
            error = self.error.unwrap_or("-"),
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_and_model_names_are_cut_at_a_character_boundary() {
        assert_eq!(cut("abc".into(), 3), "abc");
        assert_eq!(cut("abcd".into(), 3), "abc…");
        // 'é' is two bytes: a cut inside it moves back to before it.
        assert_eq!(cut("aé".into(), 2), "a…");
        assert_eq!(cut("/x".repeat(5000), MAX_LOGGED_PATH).len(), MAX_LOGGED_PATH + '…'.len_utf8());
    }
}
