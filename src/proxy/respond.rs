//! Turning a delivered upstream response into the client's: hop-by-hop headers dropped, the answering
//! upstream named, the body forwarded as it arrives with the slot held until it ends — or, given the
//! request, a stream that may be resumed relayed by `resume.rs`, and a JSON response committed early
//! by keep-alive blank lines by `committed.rs`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, Version};
use tokio::time::Instant;

use super::attempts::{self, Sent};
use super::request::{BudgetHold, Inspection, Outgoing};
use super::resume::{self, Resumable};
use super::stop::Stop;
use super::{committed, headers, Generation, Proxy, ResponseBody, UPSTREAM_HEADER};
use crate::error::ProxyError;

impl Proxy {
    /// The client's response for a delivered upstream response (see `stream_back`). Given the request,
    /// a readable stream that may be resumed is relayed by `resume.rs`, and a JSON response committed
    /// early by keep-alive blank lines by `committed.rs`.
    pub(super) fn respond(
        self: &Arc<Self>,
        sent: Sent,
        generation: &Arc<Generation>,
        request: Option<(Outgoing, Inspection, Instant, Option<BudgetHold>)>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let target = sent.target;
        let committed = !sent.complete && sent.prefix.first().is_some_and(|c| c.iter().all(u8::is_ascii_whitespace));
        let response = stream_back(sent, generation, &self.stop);
        let Some((outgoing, seen, deadline, hold)) = request else { return Ok(response) };
        let headers = response.headers();
        let media = |prefix: &[u8]| headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(prefix));
        let (sse, json) = (media(b"text/event-stream"), media(b"application/json"));
        let encoded = headers.contains_key(header::CONTENT_ENCODING);
        if response.status() != http::StatusCode::OK || encoded || response.body().is_full() {
            return Ok(response);
        }
        let resumable =
            sse && generation.config.fallback.resume && Resumable::of(outgoing.path(), outgoing.body()).is_some();
        if !(resumable || json && committed) {
            return Ok(response);
        }
        let outgoing = if resumable { attempts::retargeted(generation, &outgoing, &seen, target)? } else { outgoing };
        let (parts, body) = response.into_parts();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let request =
            resume::Continuation { generation: generation.clone(), outgoing, seen, deadline, target, _hold: hold };
        if resumable {
            tokio::spawn(resume::relay(self.clone(), request, body.report_cuts(), tx));
        } else {
            tokio::spawn(committed::relay(self.clone(), request, body, tx));
        }
        Ok(Response::from_parts(parts, ResponseBody::relayed(rx)))
    }
}

/// The client's response from the upstream's: hop-by-hop headers dropped, the body forwarded as it
/// arrives, the admission slot held until the body ends (a body held whole gives it back at once).
fn stream_back(sent: Sent, generation: &Generation, stop: &Arc<Stop>) -> Response<ResponseBody> {
    let Sent { response, permit, prefix, complete, target } = sent;
    let idle_timeout = generation.config.upstream.idle_timeout;
    let (mut parts, incoming) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    if let Ok(name) = HeaderValue::from_str(&generation.targets[target].name) {
        parts.headers.insert(UPSTREAM_HEADER, name);
    }
    if complete {
        drop(permit);
        let body: Vec<u8> = prefix.concat();
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        return Response::from_parts(parts, ResponseBody::full(Bytes::from(body)));
    }
    // An upstream that compressed anyway (sluice asks for identity) is passed through untouched: its
    // bytes cannot be read for usage, nor gain an error event.
    let readable = headers::readable_sse(&parts.headers);
    if readable {
        // A broken stream gains an error event, so it must not promise a length.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let mut body = ResponseBody::upstream(prefix, incoming, idle_timeout, readable, stop.watch());
    body.hold(permit);
    Response::from_parts(parts, body)
}
