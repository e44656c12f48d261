//! What sits on the way to the upstream in the egress tests: a small HTTP CONNECT proxy (optionally
//! demanding credentials, or refusing every tunnel with 407) and a TLS front for the mock, with a
//! certificate from the test CA in `tests/fixtures/tls` (made for these tests only; valid until 2126).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A host name only the test proxy knows: it tunnels it to 127.0.0.1 (nothing resolves it otherwise).
pub const MOCK_HOST: &str = "mock.sluice.test";

/// How the proxy treats a CONNECT.
#[derive(Clone)]
pub enum Policy {
    Open,
    /// Tunnels only with `Proxy-Authorization: Basic <base64(user:pass)>` of these.
    Credentials(String),
    /// Answers every CONNECT 407.
    Refuse,
}

pub struct ConnectProxy {
    pub addr: SocketAddr,
    /// The targets of the tunnels it opened (`host:port`).
    tunnels: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    pub async fn start(policy: Policy) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let seen = tunnels.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, policy.clone(), seen.clone()));
            }
        });
        ConnectProxy { addr, tunnels }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

async fn serve(mut client: TcpStream, policy: Policy, tunnels: Arc<Mutex<Vec<String>>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if client.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let Some(target) = head.strip_prefix("CONNECT ").and_then(|rest| rest.split_whitespace().next()) else {
        let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n").await;
        return;
    };
    let authorized = match &policy {
        Policy::Open => true,
        Policy::Refuse => false,
        Policy::Credentials(expected) => head.lines().any(|line| {
            line.to_ascii_lowercase().starts_with("proxy-authorization:")
                && line.split_whitespace().nth(2) == Some(expected.as_str())
        }),
    };
    if !authorized {
        let _ = client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    }
    // The name the tests give the mock where it must not look like loopback (the proxy resolves it).
    let address = target.replace(MOCK_HOST, "127.0.0.1");
    let Ok(mut upstream) = TcpStream::connect(address).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n").await;
        return;
    };
    tunnels.lock().unwrap().push(target.to_string());
    if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// `user:pass` as a Basic credential.
pub fn basic(user_pass: &str) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = user_pass.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The test CA's certificate (PEM).
pub fn test_ca() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/ca.pem")
}

/// The test server certificate (for `localhost` and 127.0.0.1) behind an acceptor offering `alpn`.
pub fn tls_acceptor(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("server.pem")).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS front for `backend` (the mock): HTTPS on a port of its own, plain bytes behind it.
pub async fn tls_front(backend: SocketAddr) -> SocketAddr {
    let acceptor = tls_acceptor(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else { return };
                let Ok(mut plain) = TcpStream::connect(backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

/// An HTTPS upstream that speaks only HTTP/2 (ALPN `h2`) and allows `streams` concurrent streams per
/// connection. Each request is held until `hold_for` requests are in flight at once (or 30 s pass), then
/// answered with a completion; it counts connections and the most requests in flight at once.
pub struct H2Upstream {
    pub addr: SocketAddr,
    counts: Arc<H2Counts>,
}

#[derive(Default)]
struct H2Counts {
    connections: std::sync::atomic::AtomicUsize,
    in_flight: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    hold_for: std::sync::atomic::AtomicUsize,
    released: tokio::sync::Notify,
}

impl H2Upstream {
    pub async fn start(streams: u32) -> H2Upstream {
        Self::start_closing(streams, None).await
    }

    /// As `start`, and each connection is closed (GOAWAY, then the end of its streams) once it has
    /// answered `answers` requests.
    pub async fn start_closing(streams: u32, answers: Option<usize>) -> H2Upstream {
        use std::sync::atomic::Ordering::SeqCst;
        let acceptor = tls_acceptor(&[b"h2"]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(H2Counts::default());
        counts.hold_for.store(1, SeqCst);
        let shared = Arc::clone(&counts);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, counts) = (acceptor.clone(), Arc::clone(&shared));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(client).await else { return };
                    counts.connections.fetch_add(1, SeqCst);
                    let (answered, enough) =
                        (Arc::new(std::sync::atomic::AtomicUsize::new(0)), Arc::new(tokio::sync::Notify::new()));
                    let (count, done) = (Arc::clone(&answered), Arc::clone(&enough));
                    let service = hyper::service::service_fn(move |_request| {
                        let (counts, count, done) = (Arc::clone(&counts), Arc::clone(&count), Arc::clone(&done));
                        async move {
                            let response = counts.answer().await;
                            if answers.is_some_and(|answers| count.fetch_add(1, SeqCst) + 1 >= answers) {
                                done.notify_one();
                            }
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let connection = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(streams)
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => return,
                        () = enough.notified() => connection.as_mut().graceful_shutdown(),
                    }
                    let _ = connection.await;
                });
            }
        });
        H2Upstream { addr, counts }
    }

    /// From now on each request is held until `requests` are in flight at once.
    pub fn hold_for(&self, requests: usize) {
        self.counts.hold_for.store(requests, std::sync::atomic::Ordering::SeqCst);
    }

    /// TLS connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counts.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests that were in flight at once.
    pub fn peak(&self) -> usize {
        self.counts.peak.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl H2Counts {
    async fn answer(&self) -> http::Response<http_body_util::Full<bytes::Bytes>> {
        use std::sync::atomic::Ordering::SeqCst;
        // Listening before counting itself in: a release in between is not missed.
        let released = self.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        if now >= self.hold_for.load(SeqCst) {
            self.released.notify_waiters();
        } else {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), released).await;
        }
        self.in_flight.fetch_sub(1, SeqCst);
        let body = super::completion("over h2");
        http::Response::builder()
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    }
}
