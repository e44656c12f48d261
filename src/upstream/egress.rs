//! How connections to the upstream leave the host: directly, or through a proxy — `upstream.proxy`, else
//! the standard `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` / `NO_PROXY` (hyper-util's matcher). An HTTP
//! proxy is asked for a CONNECT tunnel (for `http://` upstreams too), so TLS stays end to end between
//! sluice and the upstream; a SOCKS5 proxy is supported as well. Whatever goes wrong on the way names
//! the proxy (never its credentials), so an operator knows whom to ask.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use super::error_chain;
use crate::config::{without_credentials, ProxyUrl};

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("{0}")]
    Direct(String),
    #[error("through the proxy {proxy}: {why}")]
    Proxy { proxy: String, why: String },
}

/// The connector under TLS: direct, or through the proxy the matcher picks for the destination.
#[derive(Clone)]
pub struct Egress {
    direct: HttpConnector,
    proxies: Option<Arc<Matcher>>,
    /// The proxies came from the environment: a loopback upstream is then reached directly (a local
    /// upstream behind a company's proxy is never what was meant).
    from_env: bool,
}

impl Egress {
    /// `setting`: `upstream.proxy` (None: the environment's proxies).
    pub fn new(direct: HttpConnector, setting: Option<&ProxyUrl>) -> Self {
        let proxies = match setting {
            Some(url) if url.is_none() => None,
            Some(url) => Some(Matcher::builder().all(url.expose().to_string()).build()),
            None => Some(env_matcher(|name| std::env::var(name).ok())),
        };
        Self { direct, proxies: proxies.map(Arc::new), from_env: setting.is_none() }
    }

    /// The proxy `uri` goes through, without credentials (None: directly).
    pub fn proxy_for(&self, uri: &Uri) -> Option<String> {
        Some(shown(self.intercept(uri)?.uri()))
    }

    fn intercept(&self, uri: &Uri) -> Option<hyper_util::client::proxy::matcher::Intercept> {
        if self.from_env && uri.host().is_some_and(is_loopback) {
            return None;
        }
        self.proxies.as_ref()?.intercept(uri)
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, EgressError>> + Send>>;

impl Service<Uri> for Egress {
    type Response = TokioIo<TcpStream>;
    type Error = EgressError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = self.intercept(&dst);
        let mut direct = self.direct.clone();
        Box::pin(async move {
            let Some(intercept) = intercept else {
                return direct.call(dst).await.map_err(|err| EgressError::Direct(error_chain(&err)));
            };
            let proxy_uri = intercept.uri().clone();
            let proxy = shown(&proxy_uri);
            let failed = |why: String| EgressError::Proxy { proxy: proxy.clone(), why };
            // A CONNECT or SOCKS request names a port: the scheme's when the URL has none.
            let dst = with_port(dst).ok_or_else(|| failed("the upstream URL has no host".into()))?;
            match proxy_uri.scheme_str() {
                Some(scheme @ ("socks5" | "socks5h")) => {
                    let mut socks = SocksV5::new(proxy_uri.clone(), direct).local_dns(scheme == "socks5");
                    if let Some((user, pass)) = intercept.raw_auth() {
                        socks = socks.with_auth(user.to_string(), pass.to_string());
                    }
                    socks.call(dst).await.map_err(|err| failed(error_chain(&err)))
                }
                Some("http") => {
                    let mut tunnel = Tunnel::new(proxy_uri.clone(), direct);
                    if let Some(auth) = intercept.basic_auth() {
                        tunnel = tunnel.with_auth(auth.clone());
                    }
                    tunnel.call(dst).await.map_err(|err| failed(tunnel_error(&err)))
                }
                _ => Err(failed("only http:// and socks5:// proxies are supported".into())),
            }
        })
    }
}

/// A connector whose whole call — TCP, a proxy's tunnel and the TLS handshake — is bounded by
/// `upstream.connect_timeout`: a peer that accepts and then says nothing is a connect failure (nothing
/// was sent, so it is retried, and ends as 502 unreachable), not a header timeout. The one bound on the
/// way to a connection; its error names the proxy when there is one.
#[derive(Clone)]
pub struct Bounded<C> {
    inner: C,
    egress: Egress,
    timeout: Duration,
}

impl<C> Bounded<C> {
    pub fn new(inner: C, egress: Egress, timeout: Duration) -> Self {
        Self { inner, egress, timeout }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> Service<Uri> for Bounded<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let proxy = self.egress.proxy_for(&dst);
        let connecting = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => {
                    let why = format!(
                        "no connection within {} (TCP, proxy and TLS together: upstream.connect_timeout)",
                        humantime::format_duration(timeout)
                    );
                    let failed: BoxError = match proxy {
                        Some(proxy) => Box::new(EgressError::Proxy { proxy, why }),
                        None => why.into(),
                    };
                    Err(failed)
                }
            }
        })
    }
}

/// What a tunnel failure means to an operator (hyper-util does not export its error type: its text).
fn tunnel_error(err: &(dyn std::error::Error + 'static)) -> String {
    let text = error_chain(err);
    if text.contains("proxy authorization required") {
        return "the proxy wants credentials (407 Proxy Authentication Required); give them in the URL, \
                http://user:pass@host:port"
            .into();
    }
    if text.ends_with("unsuccessful") {
        return "the proxy refused the tunnel (CONNECT was not answered 200)".into();
    }
    text
}

/// The proxies the environment names, as curl reads them: `ALL_PROXY`, `HTTPS_PROXY`, `HTTP_PROXY`
/// and `NO_PROXY`, upper or lower case (lower first). `var` reads one variable.
fn env_matcher(var: impl Fn(&str) -> Option<String>) -> Matcher {
    let read = |name: &str| var(&name.to_ascii_lowercase()).or_else(|| var(name)).filter(|v| !v.trim().is_empty());
    let mut builder = Matcher::builder();
    if let Some(all) = read("ALL_PROXY") {
        builder = builder.all(all);
    }
    if let Some(https) = read("HTTPS_PROXY") {
        builder = builder.https(https);
    }
    if let Some(http) = read("HTTP_PROXY") {
        builder = builder.http(http);
    }
    if let Some(no) = read("NO_PROXY") {
        builder = builder.no(no);
    }
    builder.build()
}

/// `localhost`, `127.0.0.0/8` or `::1`.
pub(super) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A proxy's URL as logs and errors show it: no credentials, no trailing slash.
fn shown(uri: &Uri) -> String {
    without_credentials(&uri.to_string()).trim_end_matches('/').to_string()
}

/// `uri` with its scheme's port made explicit (80 for http, 443 otherwise).
fn with_port(uri: Uri) -> Option<Uri> {
    let host = uri.host()?;
    if uri.port().is_some() {
        return Some(uri);
    }
    let port = if uri.scheme_str() == Some("http") { 80 } else { 443 };
    let scheme = uri.scheme_str().unwrap_or("https");
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() };
    format!("{scheme}://{host}:{port}/").parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environments_proxies_follow_no_proxy_and_spare_loopback() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let egress = |pairs: &'static [(&'static str, &'static str)]| Egress {
            direct: HttpConnector::new(),
            proxies: Some(Arc::new(env_matcher(vars(pairs)))),
            from_env: true,
        };
        let env = &[("HTTPS_PROXY", "http://corp:3128"), ("no_proxy", "internal.example,.corp.example")];
        let via = egress(env);
        let named = |e: &Egress, url: &str| e.proxy_for(&url.parse().unwrap());
        assert_eq!(named(&via, "https://api.deepseek.com").as_deref(), Some("http://corp:3128"));
        assert_eq!(named(&via, "https://internal.example"), None, "NO_PROXY");
        assert_eq!(named(&via, "https://llm.corp.example"), None, "NO_PROXY by domain");
        assert_eq!(named(&via, "http://api.deepseek.com"), None, "HTTPS_PROXY is for https:// only");
        assert_eq!(named(&via, "https://127.0.0.1:9000"), None, "a loopback upstream is reached directly");
        assert_eq!(named(&via, "https://localhost:9000"), None);
        let all = egress(&[("ALL_PROXY", "socks5h://127.0.0.1:1080")]);
        assert_eq!(named(&all, "http://api.deepseek.com").as_deref(), Some("socks5h://127.0.0.1:1080"));
        let url = ProxyUrl::new("http://corp:3128");
        let explicit = Egress::new(HttpConnector::new(), Some(&url));
        assert!(named(&explicit, "http://127.0.0.1:9000").is_some(), "upstream.proxy applies to every upstream");
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        for host in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]", "::1"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["api.deepseek.com", "10.0.0.1", "[::2]"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn destinations_get_their_schemes_port() {
        let port = |u: &str| with_port(u.parse().unwrap()).unwrap().port_u16();
        assert_eq!(port("http://api.example.com/v1"), Some(80));
        assert_eq!(port("https://api.deepseek.com"), Some(443));
        assert_eq!(port("http://127.0.0.1:9000"), Some(9000));
        assert_eq!(port("https://[::1]/"), Some(443));
    }

    #[test]
    fn an_explicit_proxy_is_used_for_everything_and_named_without_credentials() {
        let url = ProxyUrl::new("http://alice:s3cret@proxy.corp:3128");
        let egress = Egress::new(HttpConnector::new(), Some(&url));
        let named = egress.proxy_for(&"https://api.deepseek.com".parse().unwrap()).unwrap();
        assert!(named == "http://[redacted]@proxy.corp:3128" || named == "http://proxy.corp:3128", "{named}");
        assert!(!named.contains("s3cret"));
        let none = ProxyUrl::new("none");
        let egress = Egress::new(HttpConnector::new(), Some(&none));
        assert_eq!(egress.proxy_for(&"https://api.deepseek.com".parse().unwrap()), None);
    }
}
