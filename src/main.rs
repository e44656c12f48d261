//! The `sluice` binary: parse flags, load config (exit 64 on error), set up logging, bind, serve until
//! SIGTERM/SIGINT.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sluice::cli::{Cli, Command};
use sluice::config::{self, Config};
use sluice::{observe, proxy, server};

/// sysexits.h EX_USAGE: the configuration is unusable.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match config::load(&cli.overrides(), &env) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("sluice: invalid configuration: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => check_config(&config),
        Command::Run => run(config),
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
    print!(
        "{}",
        config
            .to_redacted_toml()
            .context("cannot print the config")?
    );
    if config.upstream.api_key.is_none() {
        println!("# no API key configured: clients' own Authorization headers are passed through");
    }
    Ok(())
}

fn run(config: Config) -> anyhow::Result<()> {
    observe::init_logging(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let listen = config.server.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let proxy =
            Arc::new(proxy::Proxy::new(config).context("cannot set up the upstream client")?);
        tracing::info!(
            listen = %listener.local_addr()?,
            upstream = %proxy.config().upstream.base_url,
            api_key = proxy.config().upstream.api_key.is_some(),
            version = env!("CARGO_PKG_VERSION"),
            "sluice is listening"
        );
        server::run(listener, proxy, shutdown_signal()).await;
        tracing::info!("sluice stopped");
        Ok(())
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot watch SIGTERM; only SIGINT stops sluice");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
