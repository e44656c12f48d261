//! The body sluice sends back: its own small JSON, or the upstream's body forwarded frame by frame as it
//! arrives. It carries the request's admission permit and log record, so the slot is held — and the log
//! line written — until the last byte has gone to the client or the client has gone away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::admission::Permit;
use crate::error::error_event;
use crate::observe::{End, RequestLog};

/// The error type of a body whose upstream broke.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body of every request sluice answers.
pub struct ResponseBody {
    kind: Kind,
    /// Frees the request's concurrency slot when the body ends or is dropped.
    permit: Option<Permit>,
    /// Written when the body is dropped: the one log line per request.
    log: Option<RequestLog>,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamStream>),
}

/// The upstream's body in flight, with the stall detector and what the SSE error rule needs.
struct UpstreamStream {
    incoming: Incoming,
    idle_timeout: Duration,
    /// Fires when no frame came for `idle_timeout`; re-armed lazily from `last_frame`.
    idle: Pin<Box<Sleep>>,
    last_frame: Instant,
    /// Set for `text/event-stream` responses: a broken stream then ends with an in-band error event.
    sse: Option<SseTail>,
    ended: bool,
    /// Set when the stream ended through a failure rather than the upstream's own end.
    broke: bool,
}

/// Just enough of an SSE stream's past to end it cleanly: the last two bytes and whether `[DONE]` came.
#[derive(Default)]
struct SseTail {
    last: [u8; 2],
    done: bool,
}

impl SseTail {
    fn observe(&mut self, chunk: &[u8]) {
        if chunk.len() >= 2 {
            self.last = [chunk[chunk.len() - 2], chunk[chunk.len() - 1]];
        } else if let Some(&byte) = chunk.last() {
            self.last = [self.last[1], byte];
        }
        if !self.done {
            self.done = chunk.windows(12).any(|w| w == b"data: [DONE]");
        }
    }

    /// What must precede a new event so that it starts on a fresh line after a finished event.
    fn separator(&self) -> &'static [u8] {
        match self.last {
            [_, 0] => b"",
            [b'\n', b'\n'] => b"",
            [_, b'\n'] => b"\n",
            _ => b"\n\n",
        }
    }
}

impl ResponseBody {
    /// A complete body held in memory (sluice's own answers).
    pub fn full(bytes: Bytes) -> Self {
        Self { kind: Kind::Full(Some(bytes)), permit: None, log: None }
    }

    /// A whole response of sluice's own: status, content type and body.
    pub fn response(status: http::StatusCode, content_type: &'static str, body: Bytes) -> http::Response<Self> {
        let mut response = http::Response::new(Self::full(body));
        *response.status_mut() = status;
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        response
    }

    /// The upstream's body, forwarded as it arrives. `sse` turns on the in-band error event.
    pub fn upstream(incoming: Incoming, idle_timeout: Duration, sse: bool) -> Self {
        let now = Instant::now();
        let stream = UpstreamStream {
            incoming,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            last_frame: now,
            sse: sse.then(SseTail::default),
            ended: false,
            broke: false,
        };
        Self { kind: Kind::Upstream(Box::new(stream)), permit: None, log: None }
    }

    /// Hands the body the permit to hold until it ends.
    pub fn hold(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }

    /// Hands the body the log record to complete and write when it ends.
    pub fn log_to(&mut self, log: RequestLog) {
        self.log = Some(log);
    }

    fn finish(&mut self, end: End) {
        self.permit = None;
        if let Some(log) = &mut self.log {
            log.end(end);
        }
    }

    fn sent(&mut self, chunk: &[u8]) {
        if let Some(log) = &mut self.log {
            log.sent(chunk);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(stream) => stream.poll_next(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent(data);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(End::UpstreamBroken),
            Poll::Ready(None) => {
                let end = match &this.kind {
                    Kind::Upstream(stream) if stream.broke() => End::UpstreamBroken,
                    _ => End::Complete,
                };
                this.finish(end);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(stream) => stream.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            // An SSE stream may gain an error event at the end, so it promises no length.
            Kind::Upstream(stream) if stream.sse.is_some() => SizeHint::default(),
            Kind::Upstream(stream) => stream.incoming.size_hint(),
        }
    }
}

/// Why a forwarded body broke.
#[derive(Debug, thiserror::Error)]
enum StreamBroke {
    #[error("the upstream stream broke: {0}")]
    Upstream(hyper::Error),
    #[error("the upstream stream stalled: no data for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
}

impl UpstreamStream {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.last_frame = Instant::now();
                if let (Some(tail), Some(data)) = (&mut self.sse, frame.data_ref()) {
                    tail.observe(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(self.broken(StreamBroke::Upstream(err))),
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                if self.idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let deadline = self.last_frame + self.idle_timeout;
                if deadline <= Instant::now() {
                    return Poll::Ready(self.broken(StreamBroke::Stalled(self.idle_timeout)));
                }
                self.idle.as_mut().reset(deadline);
            },
        }
    }

    /// Ends the stream after a failure: SSE gets one final error event, anything else an error that
    /// makes the server abort the response (the client sees a broken body, never a short success).
    fn broken(&mut self, why: StreamBroke) -> Option<Result<Frame<Bytes>, BoxError>> {
        self.ended = true;
        self.broke = true;
        match &self.sse {
            Some(tail) if tail.done => None, // everything the client needed has arrived
            Some(tail) => {
                tracing::warn!(error = %why, "ending the client's stream with an error event");
                let event = error_event(&why.to_string(), "sluice_upstream_stream_error");
                let mut bytes = Vec::with_capacity(event.len() + 2);
                bytes.extend_from_slice(tail.separator());
                bytes.extend_from_slice(&event);
                Some(Ok(Frame::data(Bytes::from(bytes))))
            }
            None => {
                tracing::warn!(error = %why, "aborting the client's response");
                Some(Err(Box::new(why)))
            }
        }
    }

    /// True when the stream ended through a failure (an SSE error event was sent).
    fn broke(&self) -> bool {
        self.broke && !self.sse.as_ref().is_some_and(|tail| tail.done)
    }
}
