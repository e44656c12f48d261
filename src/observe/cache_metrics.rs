//! The cache's metrics: requests by result (hit, miss, bypass, coalesced), what the memory backend holds,
//! evictions, backend errors, bytes written, and the tokens that hits and coalesced requests did not pay
//! for. Registered in the one registry (`metrics.rs`); totals kept for `/status`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::usage::Usage;

/// What the cache did with a request (`x-sluice-cache`, `sluice_cache_requests_total{result}`).
pub const CACHE_RESULTS: [&str; 4] = ["hit", "miss", "bypass", "coalesced"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Every cache metric.
#[derive(Debug, Default)]
pub struct CacheMetrics {
    requests: Family<ResultLabels, Counter>,
    bytes: Gauge,
    entries: Gauge,
    evictions: Counter,
    backend_errors: Counter,
    written_bytes: Counter,
    tokens_saved: Family<KindLabels, Counter>,
    /// Per result, for `/status`.
    totals: [AtomicU64; CACHE_RESULTS.len()],
    tokens_saved_total: AtomicU64,
    held: [AtomicI64; 2],
}

impl CacheMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        for result in CACHE_RESULTS {
            drop(self.requests.get_or_create(&ResultLabels { result }));
        }
        registry.register("cache_requests", "Requests by what the cache did with them", self.requests.clone());
        registry.register("cache_bytes", "Bytes the memory cache holds", self.bytes.clone());
        registry.register("cache_entries", "Entries the memory cache holds", self.entries.clone());
        registry.register("cache_evictions", "Entries evicted to make room", self.evictions.clone());
        registry.register(
            "cache_backend_errors",
            "Cache reads and writes that failed or took too long (each served as a miss)",
            self.backend_errors.clone(),
        );
        registry.register("cache_written_bytes", "Bytes written to the cache backend", self.written_bytes.clone());
        registry.register(
            "cache_tokens_saved",
            "Tokens that cache hits and coalesced requests did not pay for, by kind",
            self.tokens_saved.clone(),
        );
    }

    /// A request's cache result; `saved` is the usage it did not pay for (hits and coalesced).
    pub fn request(&self, result: &'static str, saved: Option<Usage>) {
        self.requests.get_or_create(&ResultLabels { result }).inc();
        if let Some(i) = CACHE_RESULTS.iter().position(|r| *r == result) {
            self.totals[i].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(usage) = saved {
            self.saved(usage, 1);
        }
    }

    /// Tokens `times` requests did not pay for.
    pub fn saved(&self, usage: Usage, times: u64) {
        for (kind, count) in usage.kinds() {
            let count = count.saturating_mul(times);
            if count > 0 {
                self.tokens_saved.get_or_create(&KindLabels { kind }).inc_by(count);
            }
        }
        let total = usage.prompt_tokens.saturating_add(usage.completion_tokens).saturating_mul(times);
        self.tokens_saved_total.fetch_add(total, Ordering::Relaxed);
    }

    /// The memory backend gained (or lost) entries and bytes.
    pub fn memory_changed(&self, entries: i64, bytes: i64) {
        self.entries.inc_by(entries);
        self.bytes.inc_by(bytes);
        self.held[0].fetch_add(entries, Ordering::Relaxed);
        self.held[1].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn evicted(&self, count: u64) {
        if count > 0 {
            self.evictions.inc_by(count);
        }
    }

    pub fn backend_error(&self) {
        self.backend_errors.inc();
    }

    pub fn written(&self, bytes: usize) {
        self.written_bytes.inc_by(bytes as u64);
    }

    /// Entries and bytes the memory backend holds.
    pub fn memory(&self) -> (i64, i64) {
        (self.held[0].load(Ordering::Relaxed), self.held[1].load(Ordering::Relaxed))
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.get()
    }

    pub fn backend_errors(&self) -> u64 {
        self.backend_errors.get()
    }

    /// Requests per result since start, and tokens saved (prompt and completion).
    pub fn totals(&self) -> ([(&'static str, u64); CACHE_RESULTS.len()], u64) {
        let counts = std::array::from_fn(|i| (CACHE_RESULTS[i], self.totals[i].load(Ordering::Relaxed)));
        (counts, self.tokens_saved_total.load(Ordering::Relaxed))
    }
}
