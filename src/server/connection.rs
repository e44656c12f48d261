//! One client connection's I/O: which protocol its first bytes say it speaks (`sniff`, a peek that takes
//! nothing), and a wrapper so that no peer can hold it without a bound:
//! - the first request must arrive within `server.header_read_timeout` from accept (the protocol sniff
//!   included: a connection that never sends a byte is closed);
//! - a connection with no request in progress and no traffic for `server.idle_timeout` is closed;
//! - a client that accepts no response bytes for the stall limit (`upstream.idle_timeout`) is cut, which
//!   drops its response body and so gives its upstream slot back;
//! - hyper's own answers to malformed requests (400, 414, 431, 505, sent with an empty body) are replaced
//!   by sluice's OpenAI-shaped JSON error, like every other error of sluice's.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::error::error_json;

/// What the connection's requests tell its I/O.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Requests whose response has not ended yet.
    in_progress: AtomicUsize,
    /// Requests seen on the connection.
    started: AtomicUsize,
    /// The read side's waker, woken when the last request in progress ends (to arm the idle timer).
    reader: Mutex<Option<Waker>>,
}

impl ConnState {
    /// A request arrived (the service was called); it is in progress until the guard is dropped (with its
    /// response body, or with the request when it is abandoned before one).
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.in_progress.fetch_add(1, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    fn request_done(&self) {
        if self.in_progress.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(waker) = self.reader.lock().unwrap_or_else(PoisonError::into_inner).take() {
                waker.wake();
            }
        }
    }

    fn idle(&self) -> bool {
        self.in_progress.load(Ordering::SeqCst) == 0
    }
}

/// A request in progress on its connection.
#[derive(Debug)]
pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// The limits the wrapper enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub first_request: Duration,
    pub idle: Duration,
    pub write_stall: Duration,
}

pub struct ConnIo<T> {
    inner: T,
    state: Arc<ConnState>,
    limits: ConnLimits,
    accepted: Instant,
    last_io: Instant,
    read_timer: Option<Pin<Box<Sleep>>>,
    write_timer: Option<Pin<Box<Sleep>>>,
    /// sluice's replacement for a hyper error response, still to be written.
    replacement: Option<Bytes>,
}

impl<T> ConnIo<T> {
    pub fn new(inner: T, state: Arc<ConnState>, limits: ConnLimits) -> Self {
        let now = Instant::now();
        Self {
            inner,
            state,
            limits,
            accepted: now,
            last_io: now,
            read_timer: None,
            write_timer: None,
            replacement: None,
        }
    }

    /// When the read side must have seen traffic by: the first request's deadline, else the idle limit.
    fn read_deadline(&self) -> Option<Instant> {
        if self.state.started.load(Ordering::SeqCst) == 0 {
            return self.accepted.checked_add(self.limits.first_request);
        }
        self.state.idle().then(|| self.last_io.checked_add(self.limits.idle)).flatten()
    }
}

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Bytes no HTTP/2 connection starts with: served by hyper's HTTP/1 connection alone, whose state is
    /// half the size of hyper-util's either-protocol one (~1 KB less for every open connection).
    Http1,
    /// The HTTP/2 preface, too few bytes to tell, or the end of the stream: left to hyper-util's sniff.
    Undecided,
}

/// How an HTTP/2 connection starts (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Protocol {
    fn of(first: &[u8]) -> Self {
        if first.is_empty() || H2_PREFACE.starts_with(first) {
            Self::Undecided
        } else {
            Self::Http1
        }
    }
}

impl ConnIo<tokio::net::TcpStream> {
    /// Waits for the connection's first bytes, without taking them, within the first request's deadline.
    pub async fn sniff(&self) -> io::Result<Protocol> {
        let mut first = [0u8; H2_PREFACE.len()];
        let peek = self.inner.peek(&mut first);
        let peeked = match self.accepted.checked_add(self.limits.first_request) {
            Some(deadline) => tokio::time::timeout_at(deadline, peek)
                .await
                .map_err(|_| timed_out("no request within server.header_read_timeout"))??,
            None => peek.await?,
        };
        Ok(Protocol::of(first.get(..peeked).unwrap_or_default()))
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

/// Polls `timer` against `deadline`; true when the deadline has passed. The timer is re-armed lazily:
/// only when it fires early (the deadline moved later) or would fire late, so a busy connection does not
/// touch the timer wheel for every request.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    loop {
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        if sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        if Instant::now() >= deadline {
            return true;
        }
        sleep.as_mut().reset(deadline);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.last_io = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if !self.state.idle() {
                    // Woken when the last request in progress ends, to arm the idle timer then.
                    *self.state.reader.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
                }
                let Some(deadline) = self.read_deadline() else {
                    return Poll::Pending;
                };
                let this = &mut *self;
                if expired(&mut this.read_timer, deadline, cx) {
                    let first = this.state.started.load(Ordering::SeqCst) == 0;
                    return Poll::Ready(Err(timed_out(if first {
                        "no request within server.header_read_timeout"
                    } else {
                        "idle longer than server.idle_timeout"
                    })));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> ConnIo<T> {
    /// Writes what is left of a replacement; Ready once it is all out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(bytes) = self.replacement.as_mut() {
            if bytes.is_empty() {
                self.replacement = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => drop(bytes.split_to(n)),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// After a write returned Pending: has the client accepted nothing for the stall limit?
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = match &self.write_timer {
            Some(timer) => timer.deadline(),
            None => {
                let now = Instant::now();
                now.checked_add(self.limits.write_stall).unwrap_or(now)
            }
        };
        expired(&mut self.write_timer, deadline, cx)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacement.is_some() {
            return this.poll_replacement(cx).map_ok(|()| buf.len());
        }
        if this.state.idle() {
            if let Some(replacement) = replace_error_response(buf) {
                this.replacement = Some(replacement);
                return this.poll_replacement(cx).map_ok(|()| buf.len());
            }
        }
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => {
                if this.stalled(cx) {
                    return Poll::Ready(Err(timed_out("the client accepted no response bytes")));
                }
                Poll::Pending
            }
            ready => {
                this.write_timer = None;
                this.last_io = Instant::now();
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.replacement.is_some() {
            return this.poll_replacement(cx).map_ok(|()| total);
        }
        if this.state.idle() {
            if let Some(replacement) = bufs.iter().find(|b| !b.is_empty()).and_then(|b| replace_error_response(b)) {
                this.replacement = Some(replacement);
                return this.poll_replacement(cx).map_ok(|()| total);
            }
        }
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => {
                if this.stalled(cx) {
                    return Poll::Ready(Err(timed_out("the client accepted no response bytes")));
                }
                Poll::Pending
            }
            ready => {
                this.write_timer = None;
                this.last_io = Instant::now();
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.poll_replacement(cx)?.is_pending() {
            return Poll::Pending;
        }
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending if this.stalled(cx) => Poll::Ready(Err(timed_out("the client accepted no response bytes"))),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.poll_replacement(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// sluice's JSON answer in place of hyper's empty one to a malformed request, if `head` is one of those.
fn replace_error_response(head: &[u8]) -> Option<Bytes> {
    let rest = head.strip_prefix(b"HTTP/1.1 ").or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    let status = rest.get(..3)?;
    let (line, message, kind): (&str, &str, &str) = match status {
        b"400" => ("400 Bad Request", "the request could not be parsed as HTTP", "sluice_bad_request"),
        b"414" => ("414 URI Too Long", "the request target is too long", "sluice_uri_too_long"),
        b"431" => (
            "431 Request Header Fields Too Large",
            "the request head is larger than server.max_header_bytes",
            "sluice_header_too_large",
        ),
        b"505" => ("505 HTTP Version Not Supported", "this HTTP version is not supported", "sluice_bad_request"),
        _ => return None,
    };
    // Looked for only in an error head: every response's head passes through here.
    if !head.windows(18).any(|w| w.eq_ignore_ascii_case(b"content-length: 0\r")) {
        return None;
    }
    let body = error_json(message, kind);
    let head = format!(
        "HTTP/1.1 {line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut bytes = Vec::with_capacity(head.len() + body.len());
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(&body);
    Some(Bytes::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bytes_no_http2_connection_starts_with_are_taken_for_http1() {
        assert_eq!(Protocol::of(b"POST /v1/chat/completions HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(Protocol::of(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(Protocol::of(b"PRX"), Protocol::Http1);
        assert_eq!(Protocol::of(H2_PREFACE), Protocol::Undecided);
        assert_eq!(Protocol::of(b"PRI * HT"), Protocol::Undecided, "a partial preface waits for hyper-util");
        assert_eq!(Protocol::of(b""), Protocol::Undecided);
    }

    #[test]
    fn hypers_empty_error_answers_become_json() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let replaced = String::from_utf8(replace_error_response(hyper_431).unwrap().to_vec()).unwrap();
        assert!(replaced.starts_with("HTTP/1.1 431 "), "{replaced}");
        let body = replaced.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["type"], "sluice_header_too_large");
        assert!(replace_error_response(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").is_some());
        // Anything else is left alone: sluice's own answers, bodies, h2 frames.
        assert!(replace_error_response(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 31\r\n\r\n{}").is_none());
        assert!(replace_error_response(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(replace_error_response(b"{\"error\":1}").is_none());
    }
}
