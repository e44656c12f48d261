//! h2_upstream: an HTTPS upstream for the HTTP/2 benchmark. It speaks only HTTP/2 (ALPN `h2`), allows
//! `--streams` concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS), answers every
//! request with a small completion after `--latency`, and prints the connections it accepted when it is
//! stopped (SIGINT, Ctrl-C). Its certificate is the test one (`tests/fixtures/tls`: `localhost`,
//! signed by `ca.pem`, which sluice is given as `upstream.ca_file`). Not part of the daemon.
//!
//! cargo run --release --example h2_upstream -- --listen 127.0.0.1:9443 --streams 10 --latency 50ms

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

const COMPLETION: &str = r#"{"id":"chatcmpl-h2","object":"chat.completion","created":1,"model":"deepseek-v4-flash","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;

fn acceptor() -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn flag(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|arg| arg == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = flag(&args, "--listen", "127.0.0.1:9443").parse()?;
    let streams: u32 = flag(&args, "--streams", "10").parse()?;
    let latency: Duration = humantime::parse_duration(&flag(&args, "--latency", "50ms"))?;
    let acceptor = acceptor()?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::clone(&connections);
    let serving = async move {
        while let Ok((client, _)) = listener.accept().await {
            let (acceptor, accepted) = (acceptor.clone(), Arc::clone(&accepted));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(client).await else { return };
                accepted.fetch_add(1, Ordering::Relaxed);
                let service = hyper::service::service_fn(move |_request| async move {
                    tokio::time::sleep(latency).await;
                    let mut response = http::Response::new(Full::new(Bytes::from_static(COMPLETION.as_bytes())));
                    response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(streams)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    };
    tokio::select! {
        () = serving => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!("{{\"connections\": {}}}", connections.load(Ordering::Relaxed));
    Ok(())
}
