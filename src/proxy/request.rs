//! Reading a client request: what sluice refuses outright, the bounded body, who is asking (for
//! fairness), at which priority, for which model — and the upstream request built from it once, then
//! re-sent as is by every retry.

use std::borrow::Cow;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use serde::Deserialize;

use super::clients::Client;
use super::headers::{strip_hop_by_hop, strip_prefixed};
use crate::admission::{ClientId, Priority};
use crate::error::ProxyError;
use crate::proxy::body::BoxError;
use crate::upstream::Upstream;

/// Header that names the client for fair queueing.
pub const CLIENT_HEADER: &str = "x-sluice-client";
/// Header that picks the priority class.
pub const PRIORITY_HEADER: &str = "x-sluice-priority";
/// The request id header, kept from the client or made up.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Refuses what sluice never forwards: CONNECT, and HTTP/1 absolute-form targets (an open-proxy attempt).
pub fn refuse_foreign<B>(request: &Request<B>) -> Result<(), ProxyError> {
    if request.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
    }
    let http1 = matches!(request.version(), Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11);
    if http1 && request.uri().authority().is_some() {
        return Err(ProxyError::BadRequest(
            "absolute-form request targets are refused: sluice is not an open proxy".into(),
        ));
    }
    Ok(())
}

/// Whether `path` is one sluice forwards: it matches a configured prefix — one ending in `/` as a
/// prefix, any other as a whole segment (`/models` matches `/models` and `/models/x`, not `/modelsx`) —
/// and has no `.` or `..` segment (raw or percent-encoded), which could climb out of it upstream.
pub fn forwarded_path(path: &str, prefixes: &[String]) -> bool {
    let dotted = path.split('/').any(|segment| {
        let lower = segment.to_ascii_lowercase();
        matches!(lower.as_str(), "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e.")
    });
    let matches = |prefix: &String| {
        if prefix.ends_with('/') {
            return path.starts_with(prefix.as_str());
        }
        path.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    !dotted && prefixes.iter().any(matches)
}

/// What request bodies held in memory may take, all together (`server.max_buffered_bytes`).
#[derive(Debug)]
pub struct BodyBudget {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit: AtomicUsize::new(limit), used: AtomicUsize::new(0) })
    }

    /// A new limit (reload); what is held stays held.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn reserve(self: &Arc<Self>, held: &mut BudgetHold, bytes: usize) -> Result<(), ProxyError> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= limit)
            })
            .map_err(|_| ProxyError::BodiesFull)?;
        held.bytes += bytes;
        Ok(())
    }
}

/// Budget a request's body holds; given back when dropped (with the request).
#[derive(Debug)]
pub struct BudgetHold {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Reads the whole request body, refusing more than `limit` bytes (413) — early from Content-Length —
/// and more than the global budget allows (503). The bytes are a copy: a body parsed in one piece is a
/// slice of the connection's read buffer, and a queued request must not pin that whole buffer.
pub async fn read_body<B>(
    body: B,
    headers: &HeaderMap,
    limit: usize,
    budget: &Arc<BodyBudget>,
) -> Result<(Bytes, BudgetHold), ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let mut hold = BudgetHold { budget: budget.clone(), bytes: 0 };
    let expected = declared.and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
    budget.reserve(&mut hold, expected)?;
    let mut bytes = Vec::with_capacity(expected);
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| {
            let err: BoxError = err.into();
            ProxyError::BadRequest(format!("could not read the request body: {err}"))
        })?;
        let Ok(data) = frame.into_data() else { continue };
        if bytes.len() + data.len() > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let beyond = (bytes.len() + data.len()).saturating_sub(hold.bytes);
        if beyond > 0 {
            budget.reserve(&mut hold, beyond)?;
        }
        bytes.extend_from_slice(&data);
    }
    Ok((Bytes::from(bytes), hold))
}

/// What admission and the log need to know about a request.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// The JSON body's `model`, if the body is JSON and has one.
    pub model: Option<String>,
    /// The JSON body's `stream`.
    pub stream: bool,
    pub client: ClientId,
    pub priority: Priority,
}

/// Just the fields sluice reads from a JSON body; serde skips the rest without building it.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
}

impl Inspection {
    /// Reads the model from the body and the client identity: a configured client (`caller`) is itself,
    /// with its priority capped; anyone else is `x-sluice-client`, else the bearer token, else the peer
    /// IP — each hashed with this process's random key.
    pub fn new(
        headers: &HeaderMap,
        body: &[u8],
        peer: SocketAddr,
        hasher: &RandomState,
        caller: Option<&Client>,
    ) -> Self {
        let peek = serde_json::from_slice::<Peek<'_>>(body).ok();
        let client = match (caller, headers.get(CLIENT_HEADER), headers.get(header::AUTHORIZATION)) {
            (Some(known), _, _) => known.id,
            (None, Some(name), _) => hasher.hash_one((0u8, name.as_bytes())),
            (None, None, Some(token)) => hasher.hash_one((1u8, token.as_bytes())),
            (None, None, None) => hasher.hash_one((2u8, peer.ip())),
        };
        let asked = headers.get(PRIORITY_HEADER).map_or(Priority::Normal, |v| Priority::from_header(v.as_bytes()));
        // A lower class is a larger number: the ceiling is the larger of the two.
        let priority = caller.map_or(asked, |known| asked.max(known.max_priority));
        Self {
            model: peek.as_ref().and_then(|p| p.model.as_deref().map(str::to_owned)),
            stream: peek.and_then(|p| p.stream).unwrap_or(false),
            client,
            priority,
        }
    }
}

/// The upstream request, built once and cloned for each attempt.
#[derive(Clone)]
pub struct Outgoing {
    method: Method,
    /// The client's path and query, as forwarded.
    path: Arc<str>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Outgoing {
    /// Applies header hygiene, sets the request id, and targets the configured upstream. Takes the
    /// client's request head and keeps only copies: hyper's parsed values are slices of the connection's
    /// read buffer, which a queued request would otherwise pin. The key is chosen per attempt.
    pub fn new(parts: Parts, body: Bytes, upstream: &Upstream, request_id: &HeaderValue) -> Result<Self, ProxyError> {
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let uri = upstream
            .target(path)
            .ok_or_else(|| ProxyError::BadRequest(format!("request target {path:?} cannot be forwarded")))?;
        let mut client_headers = parts.headers;
        strip_hop_by_hop(&mut client_headers);
        strip_prefixed(&mut client_headers, "x-sluice-");
        client_headers.remove(header::HOST);
        client_headers.remove(header::CONTENT_LENGTH);
        // Plain bytes back: token accounting, `[DONE]` detection and in-band error events read the body,
        // and a compressed LLM response saves little next to its generation time.
        client_headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let mut headers = HeaderMap::with_capacity(client_headers.len() + 2);
        for (name, value) in &client_headers {
            headers.append(name.clone(), owned(value));
        }
        headers.insert(REQUEST_ID_HEADER, request_id.clone());
        Ok(Self { method: parts.method.clone(), path: Arc::from(path), uri, headers, body })
    }

    /// The same request for another upstream (a fallback), asking for `model` instead when given.
    pub fn retarget(&self, upstream: &Upstream, model: Option<&str>) -> Result<Self, ProxyError> {
        let uri = upstream
            .target(&self.path)
            .ok_or_else(|| ProxyError::BadRequest(format!("request target {:?} cannot be forwarded", self.path)))?;
        let body = match model {
            Some(model) => {
                with_field(&self.body, "model", serde_json::Value::from(model)).unwrap_or_else(|| self.body.clone())
            }
            None => self.body.clone(),
        };
        Ok(Self { uri, body, ..self.clone() })
    }

    /// Another request with the same headers: POST `path` on `upstream` with `body` (a continuation).
    pub fn sibling(&self, upstream: &Upstream, path: &str, body: Bytes) -> Option<Self> {
        let uri = upstream.target(path)?;
        Some(Self { method: Method::POST, path: Arc::from(path), uri, body, ..self.clone() })
    }

    /// The client's path and query, as forwarded.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The body as sent.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// A fresh request for one attempt, with the account's `key` in place of the client's (none: the
    /// client's own `Authorization` passes through).
    pub fn attempt(&self, key: Option<&HeaderValue>) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        if let Some(key) = key {
            request.headers_mut().insert(header::AUTHORIZATION, key.clone());
        }
        request
    }
}

/// A JSON object body with `field` set to `value` (None: not a JSON object).
pub fn with_field(body: &[u8], field: &str, value: serde_json::Value) -> Option<Bytes> {
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    object.insert(field.to_string(), value);
    serde_json::to_vec(&object).ok().map(Bytes::from)
}

/// A header value in its own allocation (see `Outgoing::new`).
fn owned(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// The client's `x-request-id` if it sent a usable one, else a new random id.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers.get(REQUEST_ID_HEADER).filter(|v| !v.is_empty() && v.len() <= 128).map(owned).unwrap_or_else(new_request_id)
}

/// `sluice-` and sixteen random hex digits (written by hand: `format!` cost more than the rest of this
/// step).
fn new_request_id() -> HeaderValue {
    // Hex digits are always a valid header value; the fallback is never taken.
    HeaderValue::from_bytes(&id_of(fastrand::u64(..))).unwrap_or(HeaderValue::from_static("sluice"))
}

/// `sluice-` and `n` as sixteen lowercase hex digits.
fn id_of(n: u64) -> [u8; 23] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"sluice-0000000000000000";
    for (i, digit) in id[7..].iter_mut().enumerate() {
        *digit = HEX[(n >> (60 - 4 * i)) as usize & 0xf];
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5000))
    }

    #[test]
    fn a_new_request_id_is_sluice_and_sixteen_hex_digits_and_a_clients_own_is_kept() {
        for n in [0, 1, 0x0123_4567_89ab_cdef, u64::MAX] {
            assert_eq!(id_of(n), format!("sluice-{n:016x}").as_bytes(), "{n:x}");
        }
        let id = request_id(&HeaderMap::new());
        let id = id.to_str().unwrap();
        let digits = id.strip_prefix("sluice-").unwrap();
        assert_eq!(digits.len(), 16, "{id}");
        assert!(digits.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{id}");
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()), "random");
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("mine-1"));
        assert_eq!(request_id(&headers), "mine-1");
    }

    #[test]
    fn reads_model_and_stream_without_building_the_body() {
        let hasher = RandomState::new();
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"model":"deepseek-v4-pro","stream":true}"#;
        let seen = Inspection::new(&HeaderMap::new(), body, peer(), &hasher, None);
        assert_eq!(seen.model.as_deref(), Some("deepseek-v4-pro"));
        assert!(seen.stream);
        for junk in [&b"not json"[..], b"", b"{\"model\": 5}", b"[1,2]"] {
            assert_eq!(Inspection::new(&HeaderMap::new(), junk, peer(), &hasher, None).model, None);
        }
    }

    #[test]
    fn client_identity_prefers_header_then_token_then_peer() {
        let hasher = RandomState::new();
        let with = |pairs: &[(&'static str, &'static str)], ip: [u8; 4]| {
            let mut headers = HeaderMap::new();
            for (k, v) in pairs {
                headers.insert(*k, HeaderValue::from_static(v));
            }
            Inspection::new(&headers, b"", SocketAddr::from((ip, 1)), &hasher, None).client
        };
        let named = with(&[(CLIENT_HEADER, "app-a"), ("authorization", "Bearer x")], [127, 0, 0, 1]);
        assert_eq!(named, with(&[(CLIENT_HEADER, "app-a"), ("authorization", "Bearer y")], [127, 0, 0, 2]));
        assert_ne!(named, with(&[(CLIENT_HEADER, "app-b")], [127, 0, 0, 1]));
        let token = with(&[("authorization", "Bearer x")], [127, 0, 0, 1]);
        assert_eq!(token, with(&[("authorization", "Bearer x")], [127, 0, 0, 9]));
        assert_ne!(token, with(&[("authorization", "Bearer y")], [127, 0, 0, 1]));
        assert_ne!(with(&[], [127, 0, 0, 1]), with(&[], [127, 0, 0, 2]));
    }

    #[test]
    fn only_api_paths_without_dot_segments_are_forwarded() {
        let prefixes: Vec<String> = ["/v1/", "/models", "/completions"].map(String::from).to_vec();
        for yes in ["/v1/chat/completions", "/v1//x", "/models", "/models/deepseek-v4-pro", "/completions"] {
            assert!(forwarded_path(yes, &prefixes), "{yes}");
        }
        for no in
            ["/", "/v1", "/modelsx", "/completionsX", "/v1/../admin", "/v1/./x", "/v1/%2E%2E/x", "/v1/.%2e/x", "/v2/x"]
        {
            assert!(!forwarded_path(no, &prefixes), "{no}");
        }
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut headers = HeaderMap::new();
        let made = request_id(&headers);
        assert!(made.to_str().unwrap().starts_with("sluice-"));
        assert_ne!(made, request_id(&headers));
        headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
    }
}
