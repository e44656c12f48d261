//! Which requests the cache may answer, and their key: SHA-256 over the method, the path (with `/beta`
//! and the query) and the body as canonical JSON — object keys sorted, insignificant whitespace dropped,
//! strings re-encoded, numbers kept as written — so two bodies that differ only in key order or spacing
//! share an entry. Never the API key, the client's token or `x-sluice-*` headers.

use http::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A cache key: the SHA-256 digest, shown as hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(pub [u8; 32]);

impl Key {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a client asked of the cache with `x-sluice-cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Nothing: the rules decide.
    Default,
    /// Eligible even if sampled.
    Use,
    /// Never from or into the cache.
    Skip,
    /// Fetched fresh, and the entry overwritten.
    Refresh,
}

impl Ask {
    pub fn from_header(value: Option<&[u8]>) -> Self {
        match value.map(|v| v.to_ascii_lowercase()) {
            Some(v) if v == b"use" => Ask::Use,
            Some(v) if v == b"skip" => Ask::Skip,
            Some(v) if v == b"refresh" => Ask::Refresh,
            _ => Ask::Default,
        }
    }
}

/// The deepest JSON nesting the canonical form follows (deeper bodies are not eligible).
const MAX_DEPTH: usize = 64;

/// The key of a request, if it is eligible: POST to a chat or text completion path, or GET of the model
/// list; with `deterministic_only` (and no `use`), a completion only when `temperature` is 0 and `n` is
/// absent or 1. `scope` sets entries apart that must not be shared (another upstream).
pub fn key_of(
    scope: &[u8],
    method: &Method,
    path_and_query: &str,
    body: &[u8],
    deterministic_only: bool,
    ask: Ask,
) -> Option<Key> {
    if ask == Ask::Skip {
        return None;
    }
    let path = path_and_query.split('?').next().unwrap_or("");
    let canonical = if method == Method::POST && (path.ends_with("/chat/completions") || path.ends_with("/completions"))
    {
        let value: Value = serde_json::from_slice(body).ok()?;
        let object = value.as_object()?;
        if deterministic_only && ask != Ask::Use {
            let temperature_zero = object.get("temperature").and_then(Value::as_f64) == Some(0.0);
            let single = object.get("n").is_none_or(|n| n.as_u64() == Some(1));
            if !temperature_zero || !single {
                return None;
            }
        }
        canonical_json(body)?
    } else if method == Method::GET && path.ends_with("/models") {
        Vec::new()
    } else {
        return None;
    };
    let mut hash = Sha256::new();
    hash.update(scope);
    hash.update(method.as_str().as_bytes());
    hash.update(b"\n");
    hash.update(path_and_query.as_bytes());
    hash.update(b"\n");
    hash.update(&canonical);
    Some(Key(hash.finalize().into()))
}

/// The canonical form of a JSON text, or None if it is not JSON (or nests too deep).
pub fn canonical_json(text: &[u8]) -> Option<Vec<u8>> {
    let mut parser = Parser { text, at: 0 };
    let mut out = Vec::with_capacity(text.len());
    parser.value(&mut out, 0)?;
    parser.space();
    (parser.at == text.len()).then_some(out)
}

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn space(&mut self) {
        while self.text.get(self.at).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.space();
        match *self.text.get(self.at)? {
            b'{' => self.object(out, depth),
            b'[' => self.array(out, depth),
            b'"' => {
                let string = self.string()?;
                out.extend_from_slice(serde_json::to_string(&string).ok()?.as_bytes());
                Some(())
            }
            _ => self.scalar(out),
        }
    }

    fn object(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        self.at += 1;
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        self.space();
        if self.text.get(self.at) == Some(&b'}') {
            self.at += 1;
        } else {
            loop {
                self.space();
                let name = self.string()?;
                self.space();
                (self.text.get(self.at) == Some(&b':')).then_some(())?;
                self.at += 1;
                let mut value = Vec::new();
                self.value(&mut value, depth + 1)?;
                members.push((name, value));
                self.space();
                match self.text.get(self.at)? {
                    b',' => self.at += 1,
                    b'}' => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        members.sort_by(|a, b| a.0.cmp(&b.0));
        out.push(b'{');
        for (i, (name, value)) in members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(serde_json::to_string(name).ok()?.as_bytes());
            out.push(b':');
            out.extend_from_slice(value);
        }
        out.push(b'}');
        Some(())
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        self.at += 1;
        out.push(b'[');
        self.space();
        if self.text.get(self.at) == Some(&b']') {
            self.at += 1;
        } else {
            let mut first = true;
            loop {
                if !first {
                    out.push(b',');
                }
                first = false;
                self.value(out, depth + 1)?;
                self.space();
                match self.text.get(self.at)? {
                    b',' => self.at += 1,
                    b']' => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        out.push(b']');
        Some(())
    }

    /// A string literal, decoded (so `"\u0061"` and `"a"` are the same).
    fn string(&mut self) -> Option<String> {
        let start = self.at;
        (self.text.get(self.at) == Some(&b'"')).then_some(())?;
        self.at += 1;
        loop {
            match *self.text.get(self.at)? {
                b'\\' => self.at += 2,
                b'"' => {
                    self.at += 1;
                    break;
                }
                _ => self.at += 1,
            }
        }
        serde_json::from_slice(self.text.get(start..self.at)?).ok()
    }

    /// A number, `true`, `false` or `null`, kept as written (validated).
    fn scalar(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let start = self.at;
        while self.text.get(self.at).is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
        let token = self.text.get(start..self.at)?;
        serde_json::from_slice::<Value>(token).ok().filter(|v| !v.is_string() && !v.is_object() && !v.is_array())?;
        out.extend_from_slice(token);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(body: &str) -> Option<Key> {
        key_of(b"", &Method::POST, "/v1/chat/completions", body.as_bytes(), true, Ask::Default)
    }

    #[test]
    fn key_order_and_spacing_do_not_matter_but_content_does() {
        let a = post(r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        let b = post(
            "{ \"messages\" : [ {\"content\":\"hi\", \"role\":\"user\"} ],\n \"temperature\":0, \"model\":\"m\" }",
        );
        assert_eq!(Some(a), b);
        assert_eq!(Some(a), post(r#"{"model":"\u006d","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#));
        assert_ne!(Some(a), post(r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"ho"}]}"#));
        let streamed =
            post(r#"{"model":"m","temperature":0,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#);
        assert_ne!(Some(a), streamed, "stream and non-stream differ");
        let elsewhere = key_of(
            b"",
            &Method::POST,
            "/beta/chat/completions",
            br#"{"model":"m","temperature":0}"#,
            true,
            Ask::Default,
        );
        assert_ne!(post(r#"{"model":"m","temperature":0}"#), elsewhere, "the path counts");
    }

    #[test]
    fn numbers_are_kept_as_written() {
        assert_eq!(canonical_json(b"{\"b\": 1.50, \"a\": 1e3}").unwrap(), b"{\"a\":1e3,\"b\":1.50}");
    }

    #[test]
    fn only_deterministic_requests_unless_asked() {
        assert!(post(r#"{"model":"m","temperature":0.7}"#).is_none());
        assert!(post(r#"{"model":"m"}"#).is_none(), "no temperature: the default samples");
        assert!(post(r#"{"model":"m","temperature":0,"n":3}"#).is_none());
        assert!(post(r#"{"model":"m","temperature":0,"n":1}"#).is_some());
        let sampled = br#"{"model":"m","temperature":0.7}"#;
        assert!(key_of(b"", &Method::POST, "/v1/chat/completions", sampled, true, Ask::Use).is_some());
        assert!(key_of(b"", &Method::POST, "/v1/chat/completions", sampled, false, Ask::Default).is_some());
        assert!(key_of(b"", &Method::POST, "/v1/chat/completions", br#"{"temperature":0}"#, true, Ask::Skip).is_none());
        assert!(key_of(b"", &Method::GET, "/v1/models", b"", true, Ask::Default).is_some());
        assert!(key_of(b"", &Method::GET, "/user/balance", b"", true, Ask::Default).is_none());
        assert!(key_of(b"", &Method::POST, "/v1/embeddings", br#"{"temperature":0}"#, true, Ask::Default).is_none());
    }

    #[test]
    fn hostile_bodies_are_just_not_eligible() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(canonical_json(deep.as_bytes()).is_none());
        for bad in ["", "{", "{\"a\":}", "[1,]", "{\"a\":1}x", "\"unterminated", "{\"a\":tru}", "nul"] {
            assert!(canonical_json(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }
}
