//! The `sluice` binary: parse flags, load config (exit 64 on error), set up logging, bind, tell systemd
//! it is ready, serve until SIGTERM/SIGINT (reloading on SIGHUP).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sluice::cli::{self as command_line, Cli, ClientAction, Command};
use sluice::config::{self, Config, Overrides};
use sluice::{observe, proxy, server, service};

/// jemalloc keeps its bookkeeping apart from the memory it hands out, so buffers a connection reserves
/// but never fills (hyper's 8 KiB read and write buffers) stay out of RSS: 14 % less memory per waiting
/// request than glibc's malloc at the same throughput (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// sysexits.h EX_USAGE: the configuration is unusable.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Needs no config: a new client's token is made before there is one to paste it into.
    if let Some(Command::Client { action: ClientAction::New { name } }) = &cli.command {
        return match command_line::new_client(name) {
            Ok((token, block)) => {
                println!("# The token of client {name:?}: shown once, give it to the client as its API key.");
                println!("{token}\n");
                println!("# Paste into sluice.toml (only the token's SHA-256 is kept):\n{block}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("sluice: {err}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let overrides = cli.overrides();
    let config = match config::load(&overrides, &env) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("sluice: invalid configuration: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => check_config(&config),
        Command::Healthcheck => {
            return if service::healthcheck(&config) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Run => run(config, overrides),
        Command::Client { .. } => Ok(()), // answered above, before any config
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sluice: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(config: &Config) -> anyhow::Result<()> {
    for note in &config.notes {
        eprintln!("sluice: note: {note}");
    }
    print!("{}", config.to_redacted_toml().context("cannot print the config")?);
    if config.upstream.api_key.is_none() {
        println!("# no API key configured: clients' own Authorization headers are passed through");
    }
    Ok(())
}

fn run(config: Config, overrides: Overrides) -> anyhow::Result<()> {
    observe::init_logging(&config.log);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    let served = runtime.block_on(async {
        let listen = config.server.listen;
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        let proxy = Arc::new(proxy::Proxy::new(config).context("cannot set up the upstream client")?);
        let current = proxy.current();
        tracing::info!(
            listen = %listener.local_addr()?,
            upstream = %current.config.upstream.base_url,
            api_key = current.config.upstream.api_key.is_some(),
            version = env!("CARGO_PKG_VERSION"),
            "sluice is listening"
        );
        #[cfg(unix)]
        service::spawn_reloader(proxy.clone(), overrides);
        service::spawn_watchdog();
        service::ready();
        server::run(listener, proxy.clone(), service::shutdown_signal()).await;
        proxy.save_state();
        tracing::info!("sluice stopped");
        Ok::<(), anyhow::Error>(())
    });
    // Requests the runtime still held end with it; then their lines are written before the process ends.
    drop(runtime);
    observe::flush_request_lines();
    served
}
