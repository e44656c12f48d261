//! What sluice tells operators: the log, the one log line per request, Prometheus metrics, the live
//! status snapshot and the dashboard page that draws it.

mod cache_metrics;
mod client_metrics;
mod collector;
mod counters;
pub mod endpoints;
mod line_format;
mod log;
mod metrics;
mod recent;
mod request_log;
mod usage;

pub use crate::config::ANONYMOUS;
pub use cache_metrics::{CacheMetrics, CACHE_RESULTS};
pub use client_metrics::{ClientMetrics, ClientTotals};
pub use collector::{AccountsSource, Sources};
pub use log::{flush_request_lines, init_logging, lines_dropped, LINES_HELD};
pub use metrics::{model_label, Metrics, OUTCOMES};
pub use recent::RecentSummary;
pub use request_log::{Charge, End, RequestLog};
pub use usage::{count_events, estimate_tokens, Usage, UsageTail};
