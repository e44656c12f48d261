//! The command line (clap): `sluice [run]`, `sluice check-config`, `sluice --version`, and the flags
//! that override the config file and environment.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Overrides;

/// A rate-limit-absorbing proxy for the DeepSeek (OpenAI-compatible) API.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Config file (TOML). Without it: embedded defaults, then SLUICE_<SECTION>__<KEY> env, then flags.
    #[arg(long, global = true, env = "SLUICE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Address to listen on (overrides server.listen).
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Upstream base URL (overrides upstream.base_url).
    #[arg(long, global = true, value_name = "URL")]
    pub upstream: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Load and validate the effective config, print it as TOML with secrets redacted.
    CheckConfig,
    /// Exit 0 if the configured listener answers /readyz with 200, else 1 (for container health checks).
    Healthcheck,
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        Overrides { config_path: self.config.clone(), listen: self.listen.clone(), upstream: self.upstream.clone() }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default_and_flags_are_global() {
        let cli = Cli::parse_from(["sluice", "--listen", "127.0.0.1:1"]);
        assert_eq!(cli.command, None);
        assert_eq!(cli.overrides().listen.as_deref(), Some("127.0.0.1:1"));
        let cli = Cli::parse_from(["sluice", "check-config", "--upstream", "http://x"]);
        assert_eq!(cli.command, Some(Command::CheckConfig));
        assert_eq!(cli.overrides().upstream.as_deref(), Some("http://x"));
    }
}
