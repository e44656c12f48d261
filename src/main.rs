//! The `sluice` binary: parse flags, load config (exit 64 on error), set up logging, bind, tell systemd
//! it is ready, serve until SIGTERM/SIGINT (reloading on SIGHUP). It serves with one single-threaded
//! runtime per core, each on a socket of its own bound to the same port: a request is read, forwarded
//! and answered on one thread, with no wake-up of another on its way (BENCHMARKS.md, fourth round).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use sluice::cli::{self as command_line, Cli, ClientAction, Command};
use sluice::config::{self, Config, Overrides};
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
    let runtimes = runtime_count();
    shard::set_count(runtimes);
    let runtime = single_threaded_runtime()?;
    let served = runtime.block_on(async {
        let listen = config.server.listen;
        let listeners = bind(listen, runtimes).with_context(|| format!("cannot listen on {listen}"))?;
        let mut listeners = listeners.into_iter();
        let listener = listeners.next().context("no listener")?;
        let proxy = Arc::new(proxy::Proxy::new(config).context("cannot set up the upstream client")?);
        let current = proxy.current();
        tracing::info!(
            listen = %listener.local_addr()?,
            upstream = %current.config.upstream.base_url,
            api_key = current.config.upstream.api_key.is_some(),
            runtimes,
            version = env!("CARGO_PKG_VERSION"),
            "sluice is listening"
        );
        let server = Arc::new(server::Server::new(proxy.clone()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut others = Vec::new();
        for (index, listener) in (1..).zip(listeners) {
            let listener = listener.into_std().context("cannot hand a listener to its runtime")?;
            others.push(spawn_runtime(index, listener, server.clone(), stopped.clone())?);
        }
        #[cfg(unix)]
        service::spawn_reloader(proxy.clone(), overrides);
        service::spawn_watchdog();
        service::ready();
        tokio::spawn(async move {
            service::shutdown_signal().await;
            stop.send_replace(true);
        });
        server.serve(listener, stop_signal(stopped)).await;
        // This runtime drives what the others share (the admission dispatcher, Redis): it runs until
        // they are done too.
        for done in others {
            let _ = done.await;
        }
        proxy.save_state();
        tracing::info!("sluice stopped");
        Ok::<(), anyhow::Error>(())
    });
    // Requests the runtime still held end with it; then their lines are written before the process ends.
    drop(runtime);
    observe::flush_request_lines();
    served
}

/// One listener for each runtime on `addr`: with several, each its own socket on the same port
/// (`SO_REUSEPORT`), so the kernel spreads new connections across the runtimes.
fn bind(addr: std::net::SocketAddr, runtimes: usize) -> std::io::Result<Vec<tokio::net::TcpListener>> {
    let socket = |addr: std::net::SocketAddr| {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        socket.set_reuseport(runtimes > 1)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    let first = socket(addr)?;
    // Port 0 picks a port once: the others join the one the first was given.
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..runtimes {
        listeners.push(socket(bound)?);
    }
    Ok(listeners)
}

/// How many runtimes serve requests: `TOKIO_WORKER_THREADS` when set, else one per core (one where
/// sockets cannot share a port).
fn runtime_count() -> usize {
    if cfg!(not(unix)) {
        return 1;
    }
    let configured = std::env::var("TOKIO_WORKER_THREADS").ok().and_then(|n| n.trim().parse::<usize>().ok());
    configured.or_else(|| std::thread::available_parallelism().ok().map(usize::from)).unwrap_or(1).max(1)
}

fn single_threaded_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")
}

/// Completes once the stop signal has been seen.
async fn stop_signal(mut stopped: tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stopped| *stopped).await;
}

/// Starts runtime `index` on a thread of its own, accepting on `listener` until the stop; the receiver
/// completes when it has drained.
fn spawn_runtime(
    index: usize,
    listener: std::net::TcpListener,
    server: Arc<server::Server>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, drained) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("sluice-rt-{index}"))
        .spawn(move || {
            shard::enter(index);
            let served = single_threaded_runtime().and_then(|runtime| {
                runtime.block_on(async {
                    let listener = tokio::net::TcpListener::from_std(listener).context("cannot share the listener")?;
                    server.serve(listener, stop_signal(stopped)).await;
                    Ok(())
                })
            });
            if let Err(err) = served {
                tracing::error!(runtime = index, error = %format!("{err:#}"), "a runtime could not serve");
            }
            let _ = done.send(());
        })
        .context("cannot start a runtime thread")?;
    Ok(drained)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_runtime_gets_a_listener_on_the_one_port() {
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(listeners.len(), 3);
        let port = listeners[0].local_addr().unwrap().port();
        assert!(listeners.iter().all(|listener| listener.local_addr().unwrap().port() == port));
        // A connection reaches one of them.
        let _client = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let accepted = listeners.iter().map(|listener| Box::pin(listener.accept()));
        let (accepted, _, _) = futures_util::future::select_all(accepted).await;
        assert!(accepted.is_ok());
    }
}
