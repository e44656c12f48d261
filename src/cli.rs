//! The command line (clap): `sluice [run]`, `sluice check-config`, `sluice healthcheck`,
//! `sluice client new NAME`, `sluice --version`, and the flags that override the config file and
//! environment.

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

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Load and validate the effective config, print it as TOML with secrets redacted.
    CheckConfig,
    /// Exit 0 if the configured listener answers /readyz with 200, else 1 (for container health checks).
    Healthcheck,
    /// Local clients ([[clients]] in the config).
    Client {
        #[command(subcommand)]
        action: ClientAction,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ClientAction {
    /// Print a fresh random token for a new client, once, and the [[clients]] block to paste (its hash).
    New {
        /// The client's name (letters, digits, '-', '_', '.').
        name: String,
    },
}

/// A fresh client token (32 random bytes from the kernel, hex) and the `[[clients]]` block for it.
pub fn new_client(name: &str) -> Result<(String, String), crate::config::ConfigError> {
    let client = crate::config::ClientConfig {
        name: name.to_string(),
        token_sha256: Some("0".repeat(64)),
        token_file: None,
        max_priority: crate::config::PriorityName::High,
        max_concurrency: None,
        rate: None,
        max_queued: None,
        daily_tokens: None,
    };
    crate::config::validate_clients(std::slice::from_ref(&client))?;
    let mut random = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").map_err(io_error)?, &mut random)
        .map_err(io_error)?;
    let token = format!("sk-sluice-{}", random.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let block = format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n# max_priority = \"low\"\n# max_concurrency = 50\n\
         # rate = \"120/min\"\n# max_queued = 2000\n# daily_tokens = 5000000\n",
        crate::config::token_sha256(&token)
    );
    Ok((token, block))
}

fn io_error(source: std::io::Error) -> crate::config::ConfigError {
    crate::config::ConfigError::Io { what: "random bytes", path: "/dev/urandom".into(), source }
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
        let cli = Cli::parse_from(["sluice", "client", "new", "batch-eval"]);
        assert_eq!(cli.command, Some(Command::Client { action: ClientAction::New { name: "batch-eval".into() } }));
    }

    #[test]
    fn a_new_client_gets_a_fresh_token_and_its_hash() {
        let (token, block) = new_client("batch-eval").unwrap();
        let (again, _) = new_client("batch-eval").unwrap();
        assert!(token.starts_with("sk-sluice-") && token.len() == 10 + 64 && token != again);
        assert!(block.contains(&crate::config::token_sha256(&token)) && !block.contains(&token), "{block}");
        let parsed: crate::config::Config = toml::from_str(&block).unwrap();
        assert_eq!(parsed.clients[0].name, "batch-eval");
        assert!(new_client("has space").is_err());
    }
}
