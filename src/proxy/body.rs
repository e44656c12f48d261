//! The body sluice sends back: its own small JSON, or the upstream's body forwarded frame by frame as it
//! arrives. It carries the request's admission permit and log record, so the slot is held — and the log
//! line written — until the last byte has gone to the client or the client has gone away. An SSE body is
//! forwarded event-aligned (`sse.rs`), so that a stream that breaks, stalls or is stopped by a shutdown
//! ends with one well-formed error event; any other body is aborted instead.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::cached::Outcome;
use super::sse::Aligner;
use super::stop::StopWatch;
use crate::admission::Permit;
use crate::cache::Member;
use crate::error::error_event;
use crate::observe::{End, RequestLog};
use crate::upstream::UpstreamBody;

/// The error type of a body whose upstream broke.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body of every request sluice answers.
pub struct ResponseBody {
    kind: Kind,
    /// Frees the request's concurrency slot when the body ends or is dropped.
    permit: Option<Permit>,
    /// Written when the body is dropped: the one log line per request.
    log: Option<RequestLog>,
    /// Dropped with the body (the connection's mark that a request is in progress).
    attached: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// A relayed body ended through a failure (its relay said `Broken`).
    relay_broke: bool,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamStream>),
    /// Frames relayed from a task that owns the real body (see `relay`).
    Relayed(tokio::sync::mpsc::Receiver<Relay>),
    /// A member's read of a call shared by identical requests (`cache::coalesce`).
    Shared(Box<Member<Outcome>>),
}

/// What a relay task passes on.
pub enum Relay {
    Frame(Result<Frame<Bytes>, BoxError>),
    /// The body ended as it should.
    End,
    /// The body ended through a failure (a stream's in-band error event went out first).
    Broken,
    /// How the request behind a head sent early fared (`queued.rs`): for its log line.
    Settled(Box<Settled>),
}

/// What a relay learned after the head went out: the request's progress, its status and outcome, and
/// the model that answered.
pub struct Settled {
    pub progress: super::attempts::Progress,
    pub status: u16,
    pub outcome: &'static str,
    pub model_label: Option<String>,
    pub error: Option<&'static str>,
    /// The upstream's stream follows: its usage is read (and a quota charged) from here on.
    pub read_usage: bool,
}

/// The upstream's body in flight, with the stall detector and what the SSE error rule needs.
struct UpstreamStream {
    /// Bytes read before the response was delivered (`deliver.rs`), sent first.
    prefix: std::collections::VecDeque<Bytes>,
    incoming: UpstreamBody,
    idle_timeout: Duration,
    /// Fires when no frame came for `idle_timeout`; re-armed lazily from `last_frame`.
    idle: Pin<Box<Sleep>>,
    last_frame: Instant,
    /// Set for readable `text/event-stream` responses: forwarded event-aligned, a broken stream then ends
    /// with an in-band error event.
    sse: Option<Aligner>,
    /// The end of a shutdown drain.
    stop: StopWatch,
    ended: bool,
    /// Set when the stream ended through a failure rather than the upstream's own end.
    broke: bool,
    /// A break is reported as the body's error (for the resume relay to decide), never an error event.
    report_cuts: bool,
}

impl ResponseBody {
    /// A complete body held in memory (sluice's own answers).
    pub fn full(bytes: Bytes) -> Self {
        Self { kind: Kind::Full(Some(bytes)), permit: None, log: None, attached: None, relay_broke: false }
    }

    /// A whole response of sluice's own: status, content type and body.
    pub fn response(status: http::StatusCode, content_type: &'static str, body: Bytes) -> http::Response<Self> {
        let mut response = http::Response::new(Self::full(body));
        *response.status_mut() = status;
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        response
    }

    /// The upstream's body, forwarded as it arrives (after `prefix`, what was read of it already). `sse`
    /// turns on event alignment and the error event.
    pub fn upstream(
        prefix: Vec<Bytes>,
        incoming: UpstreamBody,
        idle_timeout: Duration,
        sse: bool,
        stop: StopWatch,
    ) -> Self {
        let now = Instant::now();
        let stream = UpstreamStream {
            prefix: prefix.into(),
            incoming,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            last_frame: now,
            sse: sse.then(Aligner::default),
            stop,
            ended: false,
            broke: false,
            report_cuts: false,
        };
        Self { kind: Kind::Upstream(Box::new(stream)), permit: None, log: None, attached: None, relay_broke: false }
    }

    /// A break of this stream is the body's error (a `StreamBroke`), not an error event: whoever reads it
    /// decides what the client gets (`resume.rs`).
    pub fn report_cuts(mut self) -> Self {
        if let Kind::Upstream(stream) = &mut self.kind {
            stream.report_cuts = true;
        }
        self
    }

    /// A body fed by a relay task (HTTP/2: the task can notice a client that grants no window).
    pub fn relayed(rx: tokio::sync::mpsc::Receiver<Relay>) -> Self {
        Self { kind: Kind::Relayed(rx), permit: None, log: None, attached: None, relay_broke: false }
    }

    /// A member's read of a shared call: every byte from the beginning, then live.
    pub fn shared(member: Member<Outcome>) -> Self {
        Self { kind: Kind::Shared(Box::new(member)), permit: None, log: None, attached: None, relay_broke: false }
    }

    /// Whether the body is sluice's own, already complete.
    pub fn is_full(&self) -> bool {
        matches!(self.kind, Kind::Full(_))
    }

    /// Hands the body the permit to hold until it ends.
    pub fn hold(&mut self, permit: Permit) {
        self.permit = Some(permit);
    }

    /// Hands the body the log record to complete and write when it ends.
    pub fn log_to(&mut self, log: RequestLog) {
        self.log = Some(log);
    }

    /// Keeps `value` until the body is dropped.
    pub fn attach(&mut self, value: impl std::any::Any + Send + Sync) {
        self.attached = Some(Box::new(value));
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

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(stream) => stream.poll_next(cx),
            Kind::Relayed(rx) => match rx.poll_recv(cx) {
                Poll::Ready(Some(Relay::Frame(frame))) => Poll::Ready(Some(frame)),
                Poll::Ready(Some(Relay::Settled(settled))) => {
                    if let Some(log) = &mut self.log {
                        super::track::record(log, &settled.progress);
                        log.outcome = settled.outcome;
                        if settled.read_usage {
                            log.read_usage();
                        }
                        log.error = settled.error;
                        if let Some(label) = settled.model_label {
                            log.model_label = label;
                        }
                    }
                    return self.poll_inner(cx);
                }
                Poll::Ready(Some(end @ (Relay::End | Relay::Broken))) => {
                    self.kind = Kind::Full(None);
                    self.relay_broke = matches!(end, Relay::Broken);
                    Poll::Ready(None)
                }
                // The relay gave up (the client accepted nothing for too long): not a clean end.
                Poll::Ready(None) => {
                    self.kind = Kind::Full(None);
                    Poll::Ready(Some(Err("the response was cut: the client accepted no data".into())))
                }
                Poll::Pending => Poll::Pending,
            },
            Kind::Shared(member) => match member.poll_chunk(cx) {
                Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                Poll::Ready(Some(Err(_))) => Poll::Ready(Some(Err("the upstream response was cut".into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent(data);
                }
                // A body of known length is complete with its last byte; hyper does not poll it again.
                if self.is_end_stream() {
                    let end = if self.broke() { End::UpstreamBroken } else { End::Complete };
                    self.finish(end);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(End::UpstreamBroken),
            Poll::Ready(None) => {
                let end = if self.broke() { End::UpstreamBroken } else { End::Complete };
                self.finish(end);
            }
            Poll::Pending => {}
        }
        polled
    }

    /// Whether the body ended through a failure (an SSE error event was sent, or the body aborted).
    pub fn broke(&self) -> bool {
        match &self.kind {
            Kind::Upstream(stream) => stream.broke(),
            Kind::Shared(member) => member.broke(),
            _ => self.relay_broke,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // A bug here must not take down the connection (and every HTTP/2 stream on it): end this body.
        match std::panic::catch_unwind(AssertUnwindSafe(|| this.poll_inner(cx))) {
            Ok(polled) => polled,
            Err(_) => {
                tracing::error!("a response body failed; aborting it");
                this.kind = Kind::Full(None);
                this.finish(End::UpstreamBroken);
                Poll::Ready(Some(Err("sluice failed while forwarding the response".into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(stream) => stream.ended,
            Kind::Relayed(_) | Kind::Shared(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            // An SSE stream may gain an error event at the end, so it promises no length.
            Kind::Upstream(stream) if stream.sse.is_some() => SizeHint::default(),
            Kind::Upstream(stream) => stream.incoming.size_hint(),
            Kind::Relayed(_) | Kind::Shared(_) => SizeHint::default(),
        }
    }
}

/// Why a forwarded body broke.
#[derive(Debug, thiserror::Error)]
pub enum StreamBroke {
    #[error("the upstream stream broke: {0}")]
    Upstream(hyper::Error),
    #[error("the upstream stream stalled: no data for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
    #[error("sluice is shutting down; the stream was cut")]
    ShuttingDown,
}

impl UpstreamStream {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.stop.poll_triggered(cx) {
            return Poll::Ready(self.broken(StreamBroke::ShuttingDown));
        }
        loop {
            let polled = match self.prefix.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Pin::new(&mut self.incoming).poll_frame(cx),
            };
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    self.last_frame = Instant::now();
                    let frame = match (&mut self.sse, frame.into_data()) {
                        (Some(aligner), Ok(data)) => match aligner.push(data) {
                            Some(events) => Frame::data(events),
                            None => continue, // only part of an event so far
                        },
                        (None, Ok(data)) => Frame::data(data),
                        (_, Err(frame)) => frame,
                    };
                    if self.prefix.is_empty() && self.incoming.is_end_stream() && self.sse.is_none() {
                        self.ended = true;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(self.broken(StreamBroke::Upstream(err))),
                Poll::Ready(None) => {
                    self.ended = true;
                    let rest = self.sse.as_mut().and_then(Aligner::finish);
                    return Poll::Ready(rest.map(|bytes| Ok(Frame::data(bytes))));
                }
                Poll::Pending => return self.poll_stall(cx),
            }
        }
    }

    /// While the upstream sends nothing: has it been silent for `idle_timeout`?
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last_frame + self.idle_timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(self.broken(StreamBroke::Stalled(self.idle_timeout)));
            }
            self.idle.as_mut().reset(deadline);
        }
    }

    /// Ends the stream after a failure: SSE gets one final error event, anything else an error that
    /// makes the server abort the response (the client sees a broken body, never a short success).
    fn broken(&mut self, why: StreamBroke) -> Option<Result<Frame<Bytes>, BoxError>> {
        self.ended = true;
        self.broke = true;
        match &mut self.sse {
            Some(aligner) if aligner.done() => None, // everything the client needed has arrived
            Some(aligner) if self.report_cuts => {
                aligner.abandon();
                Some(Err(Box::new(why)))
            }
            Some(aligner) => {
                tracing::warn!(error = %why, "ending the client's stream with an error event");
                let kind = match why {
                    StreamBroke::ShuttingDown => "sluice_shutting_down",
                    _ => "sluice_upstream_stream_error",
                };
                let event = error_event(&why.to_string(), kind);
                let separator = aligner.abandon();
                let mut bytes = Vec::with_capacity(event.len() + separator.len());
                bytes.extend_from_slice(separator);
                bytes.extend_from_slice(&event);
                Some(Ok(Frame::data(Bytes::from(bytes))))
            }
            None => {
                tracing::warn!(error = %why, "aborting the client's response");
                Some(Err(Box::new(why)))
            }
        }
    }

    /// True when the stream ended through a failure (an SSE error event was sent, or the body aborted).
    fn broke(&self) -> bool {
        self.broke && !self.sse.as_ref().is_some_and(Aligner::done)
    }
}
