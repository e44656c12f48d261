//! The request log line: one line at info per request, written when its response body is finished or
//! dropped, so it can say how many bytes went out and how the response ended. Never keys, never bodies.

use std::sync::Arc;

use http::Method;
use tokio::time::Instant;

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

/// What is known about a request, completed along its path and written once on drop.
#[derive(Debug)]
pub struct RequestLog {
    pub request_id: String,
    pub method: Method,
    /// The path without its query string (a query may carry things that do not belong in logs).
    pub path: String,
    pub status: u16,
    pub model: Option<Arc<str>>,
    pub stream: bool,
    /// A hash of the client identity used for fair queueing (never the token itself).
    pub client: u64,
    pub attempts: u32,
    pub queue_ms: u64,
    /// The `type` of sluice's own error, when it answered with one.
    pub error: Option<&'static str>,
    started: Instant,
    bytes: u64,
    end: End,
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
            stream: false,
            client: 0,
            attempts: 0,
            queue_ms: 0,
            error: None,
            started,
            bytes: 0,
            end: End::ClientGone,
        }
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Counts bytes sent to the client.
    pub fn add_bytes(&mut self, n: usize) {
        self.bytes += n as u64;
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
        let end = match self.end {
            End::Complete => "complete",
            End::ClientGone => "client_gone",
            End::UpstreamBroken => "upstream_broken",
        };
        tracing::info!(
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            status = self.status,
            duration_ms = self.started.elapsed().as_millis() as u64,
            bytes = self.bytes,
            end,
            model = self.model.as_deref().unwrap_or("-"),
            stream = self.stream,
            client = format_args!("{:016x}", self.client),
            attempts = self.attempts,
            queue_ms = self.queue_ms,
            error = self.error.unwrap_or("-"),
            "request"
        );
    }
}
