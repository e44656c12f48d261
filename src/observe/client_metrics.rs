//! Per-client metrics, labelled by configured client name or `anonymous` (a bounded set): requests by
//! outcome and tokens by kind as they happen, with totals kept for `/status`; queued and in-flight
//! requests are read from admission at scrape time (`collector.rs`).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::registry::Registry;

use super::counters::Counters;
use super::metrics::OUTCOMES;
use super::usage::Usage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    client: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    client: String,
    kind: &'static str,
}

/// One client's totals since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTotals {
    /// Requests per outcome, in the order of `OUTCOMES`.
    pub requests: [u64; OUTCOMES.len()],
    /// Prompt + completion tokens.
    pub tokens: u64,
}

#[derive(Debug, Default)]
pub struct ClientMetrics {
    requests: Counters<OutcomeLabels>,
    tokens: Counters<KindLabels>,
    totals: Mutex<BTreeMap<String, ClientTotals>>,
}

impl ClientMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register("client_requests", "Requests by client and final outcome", self.requests.family());
        registry.register("client_tokens", "Tokens by client and kind, from responses' usage", self.tokens.family());
    }

    pub fn request(&self, client: &str, outcome: &'static str) {
        self.requests.inc_by([client, outcome, ""], 1, || OutcomeLabels { client: client.to_string(), outcome });
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.with_totals(client, |t| t.requests[i] += 1);
        }
    }

    pub fn tokens(&self, client: &str, usage: &Usage) {
        for (kind, count) in usage.kinds() {
            if count > 0 {
                self.tokens.inc_by([client, kind, ""], count, || KindLabels { client: client.to_string(), kind });
            }
        }
        self.with_totals(client, |t| t.tokens += usage.prompt_tokens + usage.completion_tokens);
    }

    fn with_totals(&self, client: &str, change: impl FnOnce(&mut ClientTotals)) {
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        match totals.get_mut(client) {
            Some(client) => change(client),
            None => change(totals.entry(client.to_string()).or_default()),
        }
    }

    /// Every client's totals since start.
    pub fn totals(&self) -> BTreeMap<String, ClientTotals> {
        self.totals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}
