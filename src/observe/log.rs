//! Log output: tracing-subscriber to stderr, text or JSON, filtered by `log.level`.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `log.level` was validated with the config, so parsing cannot fail
/// here; should it anyway, `info` is used.
pub fn init_logging(config: &LogConfig) {
    let filter: Targets = config.level.parse().unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => registry.with(layer.with_ansi(false)).try_init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
    };
    if let Err(err) = result {
        eprintln!("sluice: logging was already set up: {err}");
    }
}
