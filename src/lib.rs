//! sluice: a small, fast daemon between applications and the DeepSeek API (OpenAI-compatible). It holds
//! the API key, queues requests behind a global limiter, retries 429s and transient failures, and streams
//! responses back untouched. Modules follow a request's path: server → proxy → admission → upstream.

pub mod admission;
pub mod cache;
pub mod catch_unwind;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod observe;
pub mod proxy;
pub mod server;
pub mod service;
pub mod shard;
pub mod upstream;
