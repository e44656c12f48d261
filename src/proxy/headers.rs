//! Header hygiene for both directions: hop-by-hop headers never cross sluice (RFC 9110 §7.6.1), nor do
//! `proxy-*` headers, nor the `x-sluice-*` headers that are addressed to sluice itself; and whether a
//! response is an SSE stream sluice can read.

use http::header::{self, HeaderMap, HeaderName};

/// Headers that describe one connection, not the message.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Whether a response with these headers is an SSE stream sluice can read event by event: a
/// `text/event-stream` body in no content coding but identity (an upstream that compressed anyway is
/// passed through untouched).
pub fn readable_sse(headers: &HeaderMap) -> bool {
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    let encoded =
        headers.get(header::CONTENT_ENCODING).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    sse && !encoded
}

/// Removes hop-by-hop headers: the fixed list, `keep-alive`, every `proxy-*`, and whatever `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The common case, a request that carries none of them, is one look at each header.
    let hop =
        |name: &HeaderName| HOP_BY_HOP.contains(name) || name == "keep-alive" || name.as_str().starts_with("proxy-");
    if !headers.keys().any(hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    strip_prefixed(headers, "proxy-");
}

/// Removes every header whose name starts with `prefix` (lower case).
pub fn strip_prefixed(headers: &mut HeaderMap, prefix: &str) {
    let doomed: Vec<HeaderName> = headers.keys().filter(|name| name.as_str().starts_with(prefix)).cloned().collect();
    for name in doomed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn drops_hop_by_hop_and_what_connection_names() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Custom-Hop"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("x-custom-hop", "1"),
            ("content-type", "application/json"),
            ("authorization", "Bearer sk"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, vec!["content-type", "authorization"]);
    }

    #[test]
    fn strips_a_prefix() {
        let mut headers = HeaderMap::new();
        headers.insert("x-sluice-client", HeaderValue::from_static("a"));
        headers.insert("x-sluice-priority", HeaderValue::from_static("high"));
        headers.insert("x-request-id", HeaderValue::from_static("r"));
        strip_prefixed(&mut headers, "x-sluice-");
        assert_eq!(headers.len(), 1);
    }
}
