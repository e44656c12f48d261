//! What sluice tells operators: the log setup and the one log line written per request.

mod log;
mod request_log;

pub use log::init_logging;
pub use request_log::{End, RequestLog};
