//! The `sluice` binary: parse flags, load config (exit 64 on error), set up logging, bind, tell systemd
//! it is ready, serve until SIGTERM/SIGINT (reloading on SIGHUP). Requests are served by one
//! single-threaded runtime per core (`server::runtimes`); this thread runs the control runtime.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice::cli::{self as command_line, Cli, ClientAction, Command};
use sluice::config::{self, Config, Overrides};
use sluice::server::runtimes;
use sluice::{observe, proxy, server, service, shard};

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
    // However `run` ends (an error, a panic), what the log writer holds is written before the process ends.
    let _flush = FlushLogOnDrop;
    let serving = runtimes::count();
    // The control runtime (this thread) has an upstream pool of its own, after the serving runtimes'.
    shard::set_count(serving + 1);
    shard::enter(serving);
    let control = runtimes::single_threaded().context("cannot start the runtime")?;
    let served = control.block_on(async {
        // Watched before anything is served: a stop that comes early still drains and saves.
        let stop = service::shutdown_signal().context("cannot watch the stop signals")?;
        let listen = config.server.listen;
        let listeners = runtimes::bind(listen, serving).with_context(|| format!("cannot listen on {listen}"))?;
        let local = listeners.first().map(std::net::TcpListener::local_addr).transpose()?;
        let proxy = Arc::new(proxy::Proxy::new(config).context("cannot set up the upstream client")?);
        let server = Arc::new(server::Server::new(proxy.clone()));
        let mut runtimes = runtimes::Serving::start(listeners, server).await?;
        // Once the runtimes accept: a reload says READY again, which must not come before they do.
        #[cfg(unix)]
        service::spawn_reloader(proxy.clone(), overrides);
        let current = proxy.current();
        tracing::info!(
            listen = %local.map_or_else(|| listen.to_string(), |addr| addr.to_string()),
            upstream = %current.config.upstream.base_url,
            api_key = current.config.upstream.api_key.is_some(),
            runtimes = serving,
            version = env!("CARGO_PKG_VERSION"),
            "sluice is listening"
        );
        service::spawn_watchdog(|interval| runtimes.alive_within(interval));
        service::ready();
        stop.await;
        // Every runtime drains within the grace and the farewell; the margin is for a stuck one.
        let grace = proxy.current().config.server.shutdown_grace;
        runtimes.drain(grace.saturating_add(server::FAREWELL).saturating_add(DRAIN_MARGIN)).await;
        proxy.save_state();
        runtimes.leave().await;
        tracing::info!("sluice stopped");
        Ok::<(), anyhow::Error>(())
    });
    // Tasks the control runtime still held end with it; then `_flush` has the lines written.
    control.shutdown_timeout(Duration::from_secs(1));
    served
}

/// Writes what the log writer holds when dropped.
struct FlushLogOnDrop;

impl Drop for FlushLogOnDrop {
    fn drop(&mut self) {
        observe::flush_request_lines();
    }
}

/// Past the grace and the farewell, how long the stop waits for a runtime that has not drained.
const DRAIN_MARGIN: Duration = Duration::from_secs(5);
