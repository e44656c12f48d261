//! Living under a service manager: readiness, reload and stop notifications for systemd (`sd_notify`,
//! a no-op without `NOTIFY_SOCKET`), the watchdog, the signals (SIGTERM/SIGINT stop, SIGHUP reloads the
//! config), and `sluice healthcheck` for the Docker image.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::config::{self, Config, Overrides};
use crate::proxy::Proxy;

/// Tells systemd something; outside systemd (no `NOTIFY_SOCKET`) it does nothing.
fn notify(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(error = %err, "cannot notify the service manager");
    }
}

/// The listener is bound: connections are accepted from now on.
pub fn ready() {
    notify(&[NotifyState::Ready]);
}

/// Sends `WATCHDOG=1` at half the interval systemd asked for (`WatchdogSec=`), while `alive` (made for
/// that interval) says every runtime serving requests is alive: if one stalls, the pings stop and
/// systemd restarts sluice.
pub fn spawn_watchdog<A: Fn() -> bool + Send + 'static>(alive: impl FnOnce(Duration) -> A) {
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tracing::info!(interval = %humantime::format_duration(interval), "systemd watchdog enabled");
        let alive = alive(interval / 2);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            let mut stalled = false;
            loop {
                tick.tick().await;
                if alive() {
                    stalled = false;
                    notify(&[NotifyState::Watchdog]);
                } else if !std::mem::replace(&mut stalled, true) {
                    tracing::error!("a runtime serving requests stopped answering: the watchdog is no longer fed");
                }
            }
        });
    }
}

/// Watches SIGTERM and SIGINT from now on (a signal that arrives before the returned future is awaited
/// is not lost); the future completes on either, after telling systemd that sluice is stopping. Should
/// one of them not be watchable, the other still stops sluice; neither is an error.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let (mut terminate, mut interrupt) = {
        use tokio::signal::unix::{signal, SignalKind};
        let (terminate, interrupt) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        match (terminate, interrupt) {
            (Err(err), Err(_)) => return Err(err),
            (terminate, interrupt) => {
                if let Err(err) = &terminate {
                    tracing::warn!(error = %err, "cannot watch SIGTERM; only SIGINT stops sluice");
                }
                if let Err(err) = &interrupt {
                    tracing::warn!(error = %err, "cannot watch SIGINT; only SIGTERM stops sluice");
                }
                (terminate.ok(), interrupt.ok())
            }
        }
    };
    Ok(async move {
        #[cfg(unix)]
        {
            // A stream that could not be made never completes: the other one decides.
            let term = async {
                match terminate.as_mut() {
                    Some(stream) => drop(stream.recv().await),
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match interrupt.as_mut() {
                    Some(stream) => drop(stream.recv().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = term => {}
                () = int => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stop signal received");
        notify(&[NotifyState::Stopping]);
    })
}

/// Reloads the config on every SIGHUP (`systemctl reload sluice`).
#[cfg(unix)]
pub fn spawn_reloader(proxy: Arc<Proxy>, overrides: Overrides) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGHUP; config reload is off");
            return;
        }
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let mut states = vec![NotifyState::Reloading];
            states.extend(NotifyState::monotonic_usec_now().ok());
            notify(&states);
            let env: HashMap<String, String> = std::env::vars().collect();
            reload(&proxy, &overrides, &env);
            notify(&[NotifyState::Ready]);
        }
    });
}

/// Re-reads the config through all its layers and puts it in force. An invalid config is refused and
/// the one in force stays; changes only a restart can apply are named in the log.
pub fn reload(proxy: &Proxy, overrides: &Overrides, env: &HashMap<String, String>) -> bool {
    let loaded = config::load(overrides, env).map_err(|err| err.to_string());
    let outcome = loaded.and_then(|config| proxy.reload(config).map_err(|err| err.to_string()));
    match outcome {
        Ok(needs_restart) => {
            if !needs_restart.is_empty() {
                tracing::warn!(keys = ?needs_restart, "config reloaded, but these changes need a restart");
            }
            tracing::info!("config reloaded");
            true
        }
        Err(err) => {
            tracing::error!(error = %err, "config reload refused; the previous config stays in force");
            false
        }
    }
}

/// `sluice healthcheck`: asks the configured listener's `/readyz` (on loopback when it listens on all
/// addresses). True on 200.
pub fn healthcheck(config: &Config) -> bool {
    let mut addr = config.server.listen;
    if addr.ip().is_unspecified() {
        let loopback = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        addr = SocketAddr::new(loopback, addr.port());
    }
    match probe(addr) {
        Ok(status_line) => {
            let ok = status_line.split_whitespace().nth(1) == Some("200");
            if !ok {
                eprintln!("sluice healthcheck: {addr}/readyz answered {status_line:?}");
            }
            ok
        }
        Err(err) => {
            eprintln!("sluice healthcheck: cannot reach {addr}/readyz: {err}");
            false
        }
    }
}

fn probe(addr: SocketAddr) -> std::io::Result<String> {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let text = String::from_utf8_lossy(&head[..n]);
    Ok(text.lines().next().unwrap_or("").to_string())
}
