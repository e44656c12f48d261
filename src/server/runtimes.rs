//! The runtimes that serve requests: one single-threaded tokio runtime per core, each on a thread of its
//! own with a listening socket of its own bound to the one port (`SO_REUSEPORT`, on Linux), so that a
//! request is read, forwarded and answered on one thread with no wake-up of another on its way. The
//! control runtime (the caller's: the admission dispatcher, the cluster, reloads, the watchdog) serves
//! no connection. They start together (a runtime that cannot start stops the daemon before it is
//! ready), drain together, and leave together: no runtime ends while another still drains, since tasks
//! one started (a shared upstream call, a Redis connection) may serve the others' requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};

use super::Server;

/// How long a runtime's end may wait for its blocking threads (a DNS lookup) before it goes anyway.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// How often each serving runtime says it is alive (for the watchdog).
const BEAT_EVERY: Duration = Duration::from_secs(1);

/// How many runtimes serve requests: `TOKIO_WORKER_THREADS` when set, else one per core; one where
/// sockets cannot spread connections over a shared port (anything but Linux).
pub fn count() -> usize {
    if cfg!(not(target_os = "linux")) {
        return 1;
    }
    let configured = std::env::var("TOKIO_WORKER_THREADS").ok().and_then(|n| {
        let parsed = n.trim().parse::<usize>().ok().filter(|n| *n > 0);
        if parsed.is_none() {
            tracing::warn!(value = %n, "TOKIO_WORKER_THREADS is not a positive number; one runtime per core");
        }
        parsed
    });
    let count = configured.or_else(|| std::thread::available_parallelism().ok().map(usize::from)).unwrap_or(1);
    if count > MAX_RUNTIMES {
        tracing::warn!(count, max = MAX_RUNTIMES, "more serving runtimes asked for than sluice runs; using the most");
    }
    count.min(MAX_RUNTIMES)
}

/// The most serving runtimes sluice starts, whatever `TOKIO_WORKER_THREADS` says.
const MAX_RUNTIMES: usize = 256;

/// A single-threaded runtime with I/O and timers.
pub fn single_threaded() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// `count` listeners on `addr`, each its own socket on the same port when there are several. Anything
/// already listening there makes it fail, as a plain bind would: the sockets that share the port are
/// bound only once a socket that does not share it could be (bound, never listening: no connection
/// can reach it and be reset), and only while this process holds the port's name, so that two sluices
/// binding at the same moment cannot both pass that check.
pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = |addr: SocketAddr, share: bool| -> std::io::Result<TcpSocket> {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        #[cfg(target_os = "linux")]
        socket.set_reuseport(share)?;
        socket.bind(addr)?;
        Ok(socket)
    };
    if count <= 1 {
        return Ok(vec![socket(addr, false)?.listen(BACKLOG)?.into_std()?]);
    }
    // Held until the group listens: from then on the plain bind of anyone else fails.
    let _binding = if addr.port() == 0 { None } else { Some(port_name(addr.port())?) };
    let plain = socket(addr, false)?;
    // Port 0 picks a port once: the group takes the one the plain bind was given.
    let bound = plain.local_addr()?;
    drop(plain);
    (0..count).map(|_| socket(bound, true)?.listen(BACKLOG)?.into_std()).collect()
}

/// How long a sluice waits for another that is binding the same port.
const PORT_NAME_WAIT: Duration = Duration::from_secs(2);

/// Takes the name of `port` for this process while it binds (a datagram socket in Linux's abstract
/// namespace, gone with its holder), waiting up to `PORT_NAME_WAIT` for another holder to finish.
fn port_name(port: u16) -> std::io::Result<Box<dyn std::any::Any>> {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt;
        let name = std::os::unix::net::SocketAddr::from_abstract_name(format!("sluice-binding-port-{port}"))?;
        let until = Instant::now() + PORT_NAME_WAIT;
        loop {
            match std::os::unix::net::UnixDatagram::bind_addr(&name) {
                Ok(held) => return Ok(Box::new(held)),
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                    return Err(std::io::Error::new(err.kind(), format!("another sluice is binding port {port}")));
                }
                Err(err) => return Err(err),
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = port;
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "several listening sockets need Linux"))
    }
}

/// Connections the kernel may hold for a listener before it accepts them (as tokio's `bind`).
const BACKLOG: u32 = 1024;

/// The serving runtimes, once started.
pub struct Serving {
    runtimes: Vec<Runtime>,
    stop: watch::Sender<bool>,
    leave: watch::Sender<bool>,
    beats: Arc<[AtomicU64]>,
    started: Instant,
}

/// One serving runtime's thread, as the control runtime sees it.
struct Runtime {
    drained: oneshot::Receiver<()>,
    ended: oneshot::Receiver<()>,
}

impl Serving {
    /// Starts a runtime on each listener, serving through `server`; returns once each accepts, or with
    /// the first that could not start.
    pub async fn start(listeners: Vec<std::net::TcpListener>, server: Arc<Server>) -> anyhow::Result<Self> {
        let (stop, _) = watch::channel(false);
        let (leave, _) = watch::channel(false);
        let beats: Arc<[AtomicU64]> = listeners.iter().map(|_| AtomicU64::new(0)).collect();
        let mut serving = Self { runtimes: Vec::new(), stop, leave, beats, started: Instant::now() };
        for (index, listener) in listeners.into_iter().enumerate() {
            let (ready, accepting) = oneshot::channel();
            let runtime = serving.spawn(index, listener, server.clone(), ready)?;
            serving.runtimes.push(runtime);
            match accepting.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(err.context(format!("runtime {index} could not start"))),
                Err(_) => anyhow::bail!("runtime {index} ended as it started"),
            }
        }
        Ok(serving)
    }

    fn spawn(
        &self,
        index: usize,
        listener: std::net::TcpListener,
        server: Arc<Server>,
        ready: oneshot::Sender<anyhow::Result<()>>,
    ) -> anyhow::Result<Runtime> {
        let (mut stopped, mut left) = (self.stop.subscribe(), self.leave.subscribe());
        let (drained_tx, drained) = oneshot::channel();
        let (ended_tx, ended) = oneshot::channel();
        let (beats, started) = (self.beats.clone(), self.started);
        std::thread::Builder::new()
            .name(format!("sluice-rt-{index}"))
            .spawn(move || {
                crate::shard::enter(index);
                let runtime = match single_threaded().context("cannot build its runtime") {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = ready.send(Err(err));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener).context("cannot take its listener") {
                        Ok(listener) => listener,
                        Err(err) => {
                            let _ = ready.send(Err(err));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    let beat = tokio::spawn(async move {
                        let mut tick = tokio::time::interval(BEAT_EVERY);
                        loop {
                            tick.tick().await;
                            let alive = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                            if let Some(slot) = beats.get(index) {
                                slot.store(alive, Ordering::Relaxed);
                            }
                        }
                    });
                    server.serve(listener, async move { drop(stopped.wait_for(|stop| *stop).await) }).await;
                    let _ = drained_tx.send(());
                    // Tasks of this runtime may still serve another's requests: it runs (and beats) until
                    // all leave.
                    drop(left.wait_for(|leave| *leave).await);
                    beat.abort();
                });
                runtime.shutdown_timeout(SHUTDOWN_WAIT);
                let _ = ended_tx.send(());
            })
            .context("cannot start a runtime thread")?;
        Ok(Runtime { drained, ended })
    }

    /// Whether every serving runtime said it was alive within `within` (for the systemd watchdog).
    pub fn alive_within(&self, within: Duration) -> impl Fn() -> bool + Send + 'static {
        let (beats, started) = (self.beats.clone(), self.started);
        // A few beats' room, however short the watchdog's interval.
        let within = within.max(BEAT_EVERY * 3).as_millis();
        move || {
            let now = started.elapsed().as_millis();
            beats.iter().all(|beat| now.saturating_sub(u128::from(beat.load(Ordering::Relaxed))) <= within)
        }
    }

    /// Stops accepting on every runtime and waits (at most `within`) until each has drained.
    pub async fn drain(&mut self, within: Duration) {
        self.stop.send_replace(true);
        let all = async {
            for runtime in &mut self.runtimes {
                let _ = (&mut runtime.drained).await;
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("a runtime did not finish draining in time; stopping anyway");
        }
    }

    /// Lets every runtime end, and waits (a bounded time) until they have.
    pub async fn leave(self) {
        self.leave.send_replace(true);
        let all = async {
            for runtime in self.runtimes {
                let _ = runtime.ended.await;
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_WAIT * 2, all).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_runtime_gets_a_listener_on_the_one_port_and_a_taken_port_is_refused() {
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(listeners.len(), 3);
        let port = listeners[0].local_addr().unwrap().port();
        assert!(listeners.iter().all(|listener| listener.local_addr().unwrap().port() == port));
        // A connection reaches one of them (the sockets do not block: each is asked in turn).
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut accepted = false;
        for _ in 0..500 {
            accepted = listeners.iter().any(|listener| listener.accept().is_ok());
            if accepted {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(accepted, "no listener accepted the connection");
        // A second daemon on the same port is refused, as with a single socket.
        let taken = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(bind(taken, 3).is_err(), "a group joined a port that was already listened on");
        assert!(bind(taken, 1).is_err());
    }

    #[tokio::test]
    async fn a_group_waits_for_another_binding_the_port_and_then_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        // Another sluice between its check and its group: it holds the port's name, nothing listens yet.
        let other = port_name(addr.port()).unwrap();
        let refused = bind(addr, 2).expect_err("a group joined a port another sluice is binding");
        assert!(refused.to_string().contains("another sluice is binding port"), "{refused}");
        drop(other);
        let group = bind(addr, 2).unwrap();
        assert_eq!(group.len(), 2, "once the other is done, the port is free to take");
        assert!(port_name(addr.port()).is_ok(), "the name is given back once the group listens");
    }

    #[test]
    fn the_watchdog_hears_all_is_well_only_while_every_runtime_beats() {
        let beats: Arc<[AtomicU64]> = [AtomicU64::new(0), AtomicU64::new(0)].into();
        let started = Instant::now().checked_sub(Duration::from_secs(60)).unwrap();
        let serving = Serving {
            runtimes: Vec::new(),
            stop: watch::channel(false).0,
            leave: watch::channel(false).0,
            beats: beats.clone(),
            started,
        };
        let alive = serving.alive_within(Duration::from_secs(10));
        let now = u64::try_from(started.elapsed().as_millis()).unwrap();
        beats[0].store(now, Ordering::Relaxed);
        beats[1].store(now - 2_000, Ordering::Relaxed);
        assert!(alive(), "both beat within the interval");
        beats[1].store(now - 30_000, Ordering::Relaxed);
        assert!(!alive(), "runtime 1 has not beaten for 30 s");
    }
}
