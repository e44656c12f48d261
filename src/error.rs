//! Every error sluice answers with itself, and the one place that turns them into OpenAI-shaped JSON
//! (`{"error":{"message","type","code"}}`) — as a response, or as an in-band SSE event.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde_json::json;

use crate::proxy::ResponseBody;
use crate::upstream::accounts::Refusal;

/// A failure that ends a request with sluice's own answer instead of the upstream's. (Cloned for each
/// member of a shared call.)
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("method {0} is not supported: sluice only forwards to its configured upstream")]
    MethodNotAllowed(Method),
    #[error("could not reach the upstream: {0}")]
    UpstreamUnreachable(String),
    #[error("the upstream sent no response headers within {}", humantime::format_duration(*.0))]
    UpstreamTimeout(Duration),
    #[error("the queue is full ({depth} requests waiting); retry later")]
    QueueFull { depth: usize, retry_after: u64 },
    #[error("this client's share of the queue is full ({queued} requests waiting, clients.max_queued); retry later")]
    ClientQueueFull { queued: usize },
    #[error("gave up after {} waiting and {attempts} attempt(s); last upstream status: {}",
        humantime::format_duration(*waited), last_status.map_or("none".to_string(), |s| s.to_string()))]
    DeadlineExceeded { waited: Duration, attempts: u32, last_status: Option<u16>, retry_after: u64 },
    #[error("sluice is shutting down; retry later")]
    ShuttingDown,
    #[error("this endpoint needs the admin token: Authorization: Bearer <token>")]
    Unauthorized,
    #[error("sluice needs a client token: Authorization: Bearer <token> of a configured client (server.require_client_token)")]
    ClientUnauthorized,
    /// sluice's own policy (a client's `daily_tokens`), not an upstream 429: waiting until the day turns helps.
    #[error("client {client:?} used {used} tokens today, its daily quota is {quota} (clients.daily_tokens); it resets at 00:00 UTC")]
    QuotaExceeded { client: String, used: u64, quota: u64, retry_after: u64 },
    #[error("this endpoint is turned off in [observe]")]
    NotFound,
    #[error("{0} is not an API path sluice forwards (upstream.paths)")]
    NotForwarded(String),
    #[error("sluice holds as many request bodies as it may (server.max_buffered_bytes); retry later")]
    BodiesFull,
    #[error("sluice failed internally ({0}); the request may not have reached the upstream")]
    Internal(String),
    /// No account can serve, and this is what the upstream said last (its 401 or 402, passed on as is).
    #[error("the upstream refused every account ({})", .0.status)]
    Refused(Refusal),
    #[error("no account can serve the request: every key was refused or every balance ran out")]
    NoAccount,
}

impl ProxyError {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::QueueFull { .. }
            | Self::ClientQueueFull { .. }
            | Self::DeadlineExceeded { .. }
            | Self::ShuttingDown
            | Self::BodiesFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized | Self::ClientUnauthorized => StatusCode::UNAUTHORIZED,
            Self::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound | Self::NotForwarded(_) => StatusCode::NOT_FOUND,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Refused(refusal) => refusal.status,
            Self::NoAccount => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `type` (and `code`) in the JSON error: what kind of failure, for programs to match on.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BodyTooLarge { .. } => "sluice_body_too_large",
            Self::BadRequest(_) => "sluice_bad_request",
            Self::MethodNotAllowed(_) => "sluice_method_not_allowed",
            Self::UpstreamUnreachable(_) => "sluice_upstream_unreachable",
            Self::UpstreamTimeout(_) => "sluice_upstream_timeout",
            Self::QueueFull { .. } | Self::ClientQueueFull { .. } | Self::BodiesFull => "sluice_queue_full",
            Self::DeadlineExceeded { .. } => "sluice_deadline_exceeded",
            Self::ShuttingDown => "sluice_shutting_down",
            Self::Unauthorized | Self::ClientUnauthorized => "sluice_unauthorized",
            Self::QuotaExceeded { .. } => "sluice_quota_exceeded",
            Self::NotFound | Self::NotForwarded(_) => "sluice_not_found",
            Self::Internal(_) => "sluice_internal_error",
            Self::Refused(_) => "upstream_refused",
            Self::NoAccount => "sluice_no_account",
        }
    }

    /// The request outcome this error stands for (`sluice_requests_total{outcome}`).
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::QueueFull { .. } | Self::ClientQueueFull { .. } | Self::BodiesFull => "queue_full",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
            Self::ShuttingDown => "shutting_down",
            Self::Internal(_) => "internal_error",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::Refused(_) => "client_error",
            Self::NoAccount => "upstream_error",
            Self::BodyTooLarge { .. }
            | Self::BadRequest(_)
            | Self::MethodNotAllowed(_)
            | Self::Unauthorized
            | Self::ClientUnauthorized
            | Self::NotFound
            | Self::NotForwarded(_) => "rejected",
        }
    }

    /// Seconds the client should wait before trying again, sent as `Retry-After`.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::QueueFull { retry_after, .. }
            | Self::DeadlineExceeded { retry_after, .. }
            | Self::QuotaExceeded { retry_after, .. } => Some(*retry_after),
            Self::ShuttingDown | Self::BodiesFull | Self::ClientQueueFull { .. } => Some(1),
            _ => None,
        }
    }

    /// The client's response: status, JSON body, and `Retry-After` where waiting helps. A refusal is the
    /// upstream's own answer, passed on.
    pub fn into_response(self) -> Response<ResponseBody> {
        if let Self::Refused(refusal) = self {
            let mut response = Response::new(ResponseBody::full(refusal.body));
            *response.status_mut() = refusal.status;
            let content_type = refusal.content_type.unwrap_or(HeaderValue::from_static("application/json"));
            response.headers_mut().insert(header::CONTENT_TYPE, content_type);
            return response;
        }
        let body = error_json(&self.to_string(), self.kind());
        let mut response = ResponseBody::response(self.status(), "application/json", body);
        if let Some(seconds) = self.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, Self::QuotaExceeded { .. }) {
            // Retrying before midnight cannot help: the OpenAI SDKs read this and do not.
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

/// The OpenAI error object as JSON bytes.
pub fn error_json(message: &str, kind: &str) -> Bytes {
    Bytes::from(json!({ "error": { "message": message, "type": kind, "code": kind } }).to_string())
}

/// The same error object as one SSE event, for ending a stream that broke mid-way.
pub fn error_event(message: &str, kind: &str) -> Bytes {
    let json = error_json(message, kind);
    let mut event = Vec::with_capacity(json.len() + 8);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(&json);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_openai_shape() {
        let value: serde_json::Value = serde_json::from_slice(&error_json("nope \"quoted\"", "sluice_x")).unwrap();
        assert_eq!(value["error"]["message"], "nope \"quoted\"");
        assert_eq!(value["error"]["type"], "sluice_x");
        assert_eq!(value["error"]["code"], "sluice_x");
    }

    #[test]
    fn event_is_one_sse_data_event() {
        let event = error_event("cut", "sluice_upstream_stream_error");
        let text = std::str::from_utf8(&event).unwrap();
        assert!(text.starts_with("data: {") && text.ends_with("}\n\n"), "{text}");
        assert_eq!(text.matches('\n').count(), 2);
    }

    #[test]
    fn waiting_errors_carry_retry_after() {
        let response = ProxyError::QueueFull { depth: 3, retry_after: 2 }.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let message = ProxyError::DeadlineExceeded {
            waited: Duration::from_secs(300),
            attempts: 4,
            last_status: Some(429),
            retry_after: 1,
        }
        .to_string();
        assert!(message.contains("429") && message.contains("4 attempt"), "{message}");
        assert!(ProxyError::BadRequest("x".into()).into_response().headers().get(header::RETRY_AFTER).is_none());
    }
}
