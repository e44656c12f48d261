//! Egress: requests reach the upstream through the configured (or the environment's) proxy, with TLS
//! end to end; `NO_PROXY` bypasses it; a refusing proxy is a clear 502 naming it; the upstream's
//! certificate is verified against the configured roots. Real time: a proxy hop and a TLS handshake
//! are real I/O, and the only waits are a second of `unreachable_wait`.

mod support;

use std::time::Duration;

use sluice::config::{Config, ProxyUrl};
use support::daemon::Daemon;
use support::egress::{basic, test_ca, tls_front, ConnectProxy, H2Upstream, Policy, MOCK_HOST};
use support::*;

fn through(mock: &Mock, proxy: &str) -> Config {
    let mut config = config_for(mock);
    config.upstream.proxy = Some(ProxyUrl::new(proxy));
    config.upstream.unreachable_wait = Duration::from_secs(1);
    config
}

#[tokio::test]
async fn requests_reach_the_upstream_only_through_the_configured_proxy() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("via the proxy"))).await;
    let proxy = ConnectProxy::start(Policy::Credentials(basic("alice:s3cret"))).await;
    let url = format!("http://alice:s3cret@{}", proxy.addr);
    let sluice = Sluice::start(through(&mock, &url)).await;
    let answer = chat(&sluice, "deepseek-v4-flash", &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(proxy.tunnels(), vec![mock.addr.to_string()], "one tunnel, to the mock");
    assert_eq!(mock.arrivals(), 1);
    assert_eq!(mock.requests()[0].headers["authorization"], format!("Bearer {TEST_KEY}").as_str());
    let status = call("GET", &sluice.url("/status"), &[], "").await.text();
    assert!(!status.contains("s3cret"), "no proxy credentials in /status");
}

#[tokio::test]
async fn a_proxy_that_refuses_is_a_clear_502_naming_the_proxy() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("never"))).await;
    let proxy = ConnectProxy::start(Policy::Refuse).await;
    let url = format!("http://bob:hunter2@{}", proxy.addr);
    let sluice = Sluice::start(through(&mock, &url)).await;
    let answer = chat(&sluice, "deepseek-v4-flash", &[]).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.error_type(), "sluice_upstream_unreachable");
    let message = answer.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains(&format!("through the proxy http://{}: ", proxy.addr)), "{message}");
    assert!(message.contains("407"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert_eq!(mock.arrivals(), 0);
}

#[tokio::test]
async fn the_environments_proxy_is_used_but_not_for_a_loopback_upstream() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("hi"))).await;
    let proxy = ConnectProxy::start(Policy::Open).await;
    let proxy_url = proxy.url();
    // An upstream by a name only the proxy resolves: reachable through HTTP_PROXY alone.
    let named = format!("http://{MOCK_HOST}:{}", mock.addr.port());
    // No balance reads: only the request below may travel.
    const QUIET: &str = "[upstream.balance]\npoll = \"0s\"\n";
    let proxied = Daemon::start_with_env(QUIET, &named, &[("HTTP_PROXY", &proxy_url)]).await;
    let answer = call("POST", &proxied.url("/v1/chat/completions"), &[], r#"{"model":"deepseek-v4-flash"}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(proxy.tunnels(), vec![format!("{MOCK_HOST}:{}", mock.addr.port())], "HTTP_PROXY was used");
    assert!(proxied.stderr().contains("upstream connections go through a proxy"), "{}", proxied.stderr());
    // A loopback upstream is reached directly, whatever the environment says (NO_PROXY: unit tests).
    let local = Daemon::start_with_env(QUIET, &mock.url(), &[("HTTP_PROXY", &proxy_url)]).await;
    let answer = call("POST", &local.url("/v1/chat/completions"), &[], r#"{"model":"deepseek-v4-flash"}"#).await;
    assert_eq!(answer.status, 200);
    assert_eq!(proxy.tunnels().len(), 1, "no tunnel for a loopback upstream");
    let ignored = Daemon::start_with_env(
        &format!("{QUIET}[upstream]\nproxy = \"none\"\n"),
        &named,
        &[("HTTP_PROXY", &proxy_url)],
    )
    .await;
    assert!(!ignored.stderr().contains("go through a proxy"), "proxy = \"none\" ignores the environment");
    assert_eq!(mock.arrivals(), 2);
}

#[tokio::test]
async fn a_private_ca_is_refused_by_default_and_trusted_with_ca_file() {
    let mock = Mock::start(|_, _| Reply::json(200, completion("over tls"))).await;
    let front = tls_front(mock.addr).await;
    let mut config = config_for(&mock);
    config.upstream.base_url = format!("https://localhost:{}", front.port());
    config.upstream.unreachable_wait = Duration::from_secs(1);
    let refusing = Sluice::start(config.clone()).await;
    let answer = chat(&refusing, "deepseek-v4-flash", &[]).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    let message = answer.json()["error"]["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("certificate"), "{message}");
    assert_eq!(mock.arrivals(), 0);
    config.upstream.ca_file = Some(test_ca());
    let trusting = Sluice::start(config.clone()).await;
    let answer = chat(&trusting, "deepseek-v4-flash", &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(mock.arrivals(), 1);
    // Through the proxy as well: the tunnel carries the TLS, the proxy sees none of it.
    let proxy = ConnectProxy::start(Policy::Open).await;
    config.upstream.proxy = Some(ProxyUrl::new(proxy.url()));
    let tunnelled = Sluice::start(config).await;
    assert_eq!(chat(&tunnelled, "deepseek-v4-flash", &[]).await.status, 200);
    // Two tunnels to the front: HTTP/2 tried first (its ALPN chose HTTP/1.1), then HTTP/1.1.
    assert_eq!(proxy.tunnels(), vec![format!("localhost:{}", front.port()); 2]);
}

/// Sends `n` chat requests to `url` at once; every one must be answered 200.
async fn all_at_once(url: &str, n: usize) -> Vec<Answer> {
    let body = r#"{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"hi"}]}"#;
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move { call("POST", &url, &[("content-type", "application/json")], body).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for answer in calls {
        let answer = answer.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        answers.push(answer);
    }
    answers
}

/// sluice forwarding to `upstream` over TLS, trusting the test CA.
async fn through_tls(upstream: &H2Upstream) -> Sluice {
    let unused = Mock::start(|_, _| Reply::json(200, completion("unused"))).await;
    let mut config = config_for(&unused);
    config.upstream.base_url = format!("https://localhost:{}", upstream.addr.port());
    config.upstream.ca_file = Some(test_ca());
    Sluice::start(config).await
}

#[tokio::test]
async fn an_http2_upstream_gets_another_connection_when_its_stream_limit_is_reached() {
    let upstream = H2Upstream::start(2).await;
    let sluice = through_tls(&upstream).await;
    // Six at once on a fresh pool: the first connection's SETTINGS say two streams, and the other four
    // requests wait for them rather than queue inside it.
    let url = sluice.url("/v1/chat/completions");
    upstream.hold_for(6);
    all_at_once(&url, 6).await;
    assert_eq!(upstream.peak(), 6, "all six in flight at once: none waited inside a full connection");
    assert_eq!(upstream.connections(), 3, "three connections of two streams each, no more");
    // The answers' streams were given back: four more at once fit in the connections there are.
    upstream.hold_for(4);
    all_at_once(&url, 4).await;
    assert_eq!(upstream.connections(), 3, "no connection opened for streams that were given back");
}

#[tokio::test]
async fn an_http2_upstream_that_closes_its_connections_after_each_answer_costs_no_request() {
    let upstream = H2Upstream::start_closing(10, Some(1)).await;
    let sluice = through_tls(&upstream).await;
    for _ in 0..4 {
        let answer = chat(&sluice, "deepseek-v4-flash", &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("x-sluice-attempts"), "1", "no retry was needed");
    }
    assert_eq!(upstream.connections(), 4, "a connection per answer");
    // Six at once against connections that each go away after one answer: all answered (a request that
    // meets a connection as it goes away may take another attempt).
    all_at_once(&sluice.url("/v1/chat/completions"), 6).await;
}

#[tokio::test]
async fn the_first_burst_on_a_new_http2_connection_keeps_to_the_servers_limit() {
    // One stream per connection: the second request of a burst must not go out before the SETTINGS.
    let upstream = H2Upstream::start(1).await;
    let sluice = through_tls(&upstream).await;
    // Six at once on a pool that has seen no SETTINGS yet: none may be refused by the server (a stream
    // it refuses would be sent again, or come back as a failed attempt and be retried).
    for answer in all_at_once(&sluice.url("/v1/chat/completions"), 6).await {
        assert_eq!(answer.header("x-sluice-attempts"), "1", "refused by the server and retried");
    }
    let status = call("GET", &sluice.url("/status"), &[], "").await.json();
    assert_eq!(status["upstreams"]["h2_sent_again"], 0, "no stream was refused and sent again");
}
