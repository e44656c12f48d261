//! The operator endpoints on the listener — `/metrics`, `/status`, `/dashboard` — with their on/off
//! switches and the optional admin token. They are answered by sluice and never forwarded upstream.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::cache_metrics::CacheMetrics;
use super::metrics::OUTCOMES;
use crate::admission::{Priority, Waiting};
use crate::config::Secret;
use crate::error::ProxyError;
use crate::proxy::{Generation, Proxy, ResponseBody};

/// The dashboard: one self-contained page (no CDN, no external fonts) that polls `/status`.
const DASHBOARD: &str = include_str!("dashboard.html");

/// An operator endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Metrics,
    Status,
    Dashboard,
}

impl Endpoint {
    /// The endpoint a path names, if any.
    pub fn of(path: &str) -> Option<Self> {
        match path {
            "/metrics" => Some(Self::Metrics),
            "/status" => Some(Self::Status),
            "/dashboard" => Some(Self::Dashboard),
            _ => None,
        }
    }
}

/// Answers an operator endpoint: 404 when switched off, 401 without the admin token when one is set.
pub fn answer<B>(endpoint: Endpoint, request: &Request<B>, proxy: &Proxy) -> Response<ResponseBody> {
    let generation = proxy.current();
    let observe = &generation.config.observe;
    let enabled = match endpoint {
        Endpoint::Metrics => observe.metrics,
        Endpoint::Status => observe.status,
        Endpoint::Dashboard => observe.dashboard,
    };
    if !enabled {
        return ProxyError::NotFound.into_response();
    }
    if let Some(token) = &observe.admin_token {
        if !authorized(request, token) {
            let mut response = ProxyError::Unauthorized.into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    match endpoint {
        Endpoint::Metrics => match proxy.metrics().render() {
            Ok(text) => respond(text.into(), "text/plain; version=0.0.4; charset=utf-8"),
            Err(_) => ProxyError::BadRequest("metrics could not be encoded".into()).into_response(),
        },
        Endpoint::Status => respond(status(proxy, &generation).to_string().into(), "application/json"),
        Endpoint::Dashboard => respond(Bytes::from_static(DASHBOARD.as_bytes()), "text/html; charset=utf-8"),
    }
}

/// The admin token as `Authorization: Bearer <token>`, or `?token=<token>` (for the dashboard in a browser).
fn authorized<B>(request: &Request<B>, token: &Secret) -> bool {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|given| token.matches(given));
    let query = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.strip_prefix("token="))
        .any(|given| token.matches(given.as_bytes()));
    bearer || query
}

fn respond(body: Bytes, content_type: &'static str) -> Response<ResponseBody> {
    let mut response = ResponseBody::response(StatusCode::OK, content_type, body);
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The `/status` snapshot.
pub fn status(proxy: &Proxy, generation: &Generation) -> Value {
    let config = &generation.config;
    let snapshot = proxy.admission().snapshot();
    let metrics = proxy.metrics();
    let totals = &metrics.totals;
    let recent = metrics.recent_summary();

    // Every configured model (idle ones too), then "unknown" and "other" for the rest. `limit` is the
    // one in force (learned when adaptive), `configured_limit` the cap from the config.
    let mut models: BTreeMap<String, (usize, Option<usize>, Option<usize>)> = config
        .limits
        .models
        .iter()
        .map(|(name, m)| (name.clone(), (0, Some(m.max_concurrency as usize), Some(m.max_concurrency as usize))))
        .collect();
    for lane in &snapshot.lanes {
        let entry = models.entry(lane.label().to_string()).or_insert((0, None, None));
        entry.0 += lane.inflight;
        if lane.configured.is_some() {
            entry.1 = lane.limit;
        }
    }
    let by_model: serde_json::Map<String, Value> = models
        .into_iter()
        .map(|(name, (inflight, limit, configured))| {
            (name, json!({ "inflight": inflight, "limit": limit, "configured_limit": configured }))
        })
        .collect();
    // Every lane (account × model) in use, with what holds it back.
    let lanes: Vec<Value> = snapshot
        .lanes
        .iter()
        .map(|lane| {
            json!({
                "account": lane.account,
                "model": lane.label(),
                "inflight": lane.inflight,
                "limit": lane.limit,
                "configured_limit": lane.configured,
                "probing": lane.probing,
                "why": lane.why,
            })
        })
        .collect();
    // Every account: whether it serves, its keys, its latest balance.
    let accounts: Vec<Value> = generation
        .accounts
        .views()
        .into_iter()
        .map(|a| {
            let balance = a.balance.map(|b| {
                let infos: Vec<Value> =
                    b.infos.iter().map(|i| json!({ "currency": i.currency, "total": i.total })).collect();
                json!({ "available": b.available, "infos": infos })
            });
            json!({
                "name": a.name,
                "available": a.available,
                "paused": a.paused,
                "keys": a.keys,
                "keys_disabled": a.keys_disabled,
                "balance": balance,
            })
        })
        .collect();
    let by_priority_all = by_priority(snapshot.queued_by_priority);
    let requests: serde_json::Map<String, Value> = OUTCOMES
        .iter()
        .zip(&totals.requests)
        .map(|(outcome, count)| (outcome.to_string(), json!(count.load(Ordering::Relaxed))))
        .collect();
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": metrics.started.elapsed().as_secs(),
        "upstream": config.upstream.base_url,
        "queue": { "depth": snapshot.queued, "by_priority": by_priority_all, "max_depth": snapshot.max_depth },
        "inflight": { "all": snapshot.inflight, "by_model": by_model },
        "limits": {
            "adaptive": config.limits.adaptive,
            "max_concurrency": snapshot.max_concurrency,
            "rate_per_second": snapshot.rate.map(|(rate, _)| rate.per_second()),
            "effective_rate_per_second": snapshot.effective_rate,
            "burst": snapshot.rate.map(|(_, burst)| burst),
            "max_wait_seconds": config.queue.max_wait.as_secs_f64(),
        },
        "probing": { "lanes": snapshot.probing_lanes(), "total_seconds": snapshot.probing_total().as_secs_f64() },
        "lanes": lanes,
        "totals": {
            "requests": requests,
            "upstream_attempts": load(&totals.attempts),
            "upstream_429": load(&totals.throttled),
            "upstream_429_absorbed": load(&totals.absorbed_429),
            "retries": load(&totals.retries),
            "prompt_tokens": load(&totals.prompt_tokens),
            "completion_tokens": load(&totals.completion_tokens),
        },
        "accounts": accounts,
        "upstreams": {
            "fallbacks": config.fallbacks.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            "circuit_open": proxy.circuit_open(),
            "resume": config.fallback.resume,
            "h2_sent_again": generation.upstream().h2_sent_again(),
        },
        "cache": cache_status(generation, &metrics.cache),
        "cluster": proxy.cluster().map(|cluster| {
            let view = cluster.view();
            let lanes: Vec<Value> = view.lanes.iter().map(|l| json!({
                "account": l.account, "model": l.model, "limit": l.limit,
                "leased_all": l.held_by_all, "leased_here": l.held_here, "probing": l.probing,
            })).collect();
            json!({ "instance": view.instance, "connected": view.connected, "members": view.members,
                    "redis_round_trips": view.round_trips, "lanes": lanes })
        }),
        "clients": clients_status(proxy, generation, &snapshot),
        "recent": recent,
    })
}

/// Every configured client and `anonymous`: requests by outcome since start, tokens today against the
/// daily quota, queued and in flight now.
fn clients_status(proxy: &Proxy, generation: &Generation, snapshot: &crate::admission::Snapshot) -> Vec<Value> {
    let totals = proxy.metrics().clients.totals();
    let row = |name: &str,
               tokens_today: Option<u64>,
               quota: Option<u64>,
               (queued, waiting): (usize, Waiting),
               inflight: usize| {
        let requests: serde_json::Map<String, Value> = match totals.get(name) {
            Some(t) => OUTCOMES
                .iter()
                .zip(t.requests)
                .filter(|(_, n)| *n > 0)
                .map(|(o, n)| (o.to_string(), json!(n)))
                .collect(),
            None => serde_json::Map::new(),
        };
        let all: u64 = totals.get(name).map_or(0, |t| t.requests.iter().sum());
        json!({
            "name": name,
            "requests": all,
            "by_outcome": requests,
            "tokens": totals.get(name).map_or(0, |t| t.tokens),
            "tokens_today": tokens_today,
            "daily_tokens": quota,
            "quota_used": quota.zip(tokens_today).map(|(q, t)| t as f64 / q as f64),
            "queued": queued,
            "queued_by_priority": by_priority(waiting.by_priority),
            "oldest_wait_seconds": waiting.oldest.map(|w| w.as_secs_f64()),
            "inflight": inflight,
        })
    };
    let mut rows = Vec::new();
    let (mut queued, mut inflight) = (0, 0);
    for name in generation.clients.names() {
        let view = snapshot.clients.iter().find(|v| v.name == *name);
        let (q, i, w) = view.map_or((0, 0, Waiting::default()), |v| (v.queued, v.inflight, v.waiting));
        queued += q;
        inflight += i;
        let quota = generation.clients.get(name).and_then(|c| c.daily_tokens);
        rows.push(row(name, Some(proxy.tokens_today(name)), quota, (q, w), i));
    }
    let anonymous = crate::config::ANONYMOUS;
    rows.push(row(
        anonymous,
        None,
        None,
        (snapshot.queued.saturating_sub(queued), snapshot.anonymous),
        snapshot.inflight.saturating_sub(inflight),
    ));
    rows
}

/// The cache: whether it is on, where it keeps entries, and what it did since start.
fn cache_status(generation: &Generation, cache: &CacheMetrics) -> Value {
    let config = &generation.config.cache;
    let (counts, tokens_saved) = cache.totals();
    let requests: serde_json::Map<String, Value> =
        counts.iter().map(|(result, count)| (result.to_string(), json!(count))).collect();
    let (entries, bytes) = cache.memory();
    json!({
        "enabled": generation.cache.is_some(),
        "connected": generation.cache.as_ref().is_some_and(|store| store.connected()),
        "backend": config.backend,
        "coalesce": config.coalesce,
        "ttl_seconds": config.ttl.as_secs(),
        "requests": requests,
        "tokens_saved": tokens_saved,
        "entries": entries,
        "bytes": bytes,
        "max_bytes": config.max_bytes.0,
        "evictions": cache.evictions(),
        "backend_errors": cache.backend_errors(),
    })
}

/// Counts by priority as `{"low": n, "normal": n, "high": n}`.
fn by_priority(counts: [usize; 3]) -> Value {
    Value::Object(Priority::ALL.iter().map(|p| (p.as_str().to_string(), json!(counts[*p as usize]))).collect())
}
