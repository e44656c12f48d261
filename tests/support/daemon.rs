//! The real `sluice` binary as a child process, for what only a process shows: signals, exit codes,
//! systemd notifications. It is started with `NOTIFY_SOCKET` pointing at a datagram socket the test owns,
//! and counted as started once `READY=1` arrives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixDatagram;

const LIMIT: Duration = Duration::from_secs(20);

pub struct Daemon {
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    child: Child,
    notify: UnixDatagram,
    stderr: Arc<Mutex<String>>,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Daemon {
    /// Starts `sluice run` with `config` (TOML) as its file, listening on a free port, forwarding to
    /// `upstream`, and waits for `READY=1`.
    pub async fn start(config: &str, upstream: &str) -> Daemon {
        Self::start_with_env(config, upstream, &[]).await
    }

    /// As `start`, with `env` set for the process too (its environment is otherwise cleared).
    pub async fn start_with_env(config: &str, upstream: &str, env: &[(&str, &str)]) -> Daemon {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("sluice-daemon-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("sluice.toml");
        std::fs::write(&config_path, config).unwrap();
        let socket_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&socket_path).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--listen", &addr.to_string(), "--upstream", upstream, "--config"])
            .arg(&config_path)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NOTIFY_SOCKET", &socket_path)
            .env("DEEPSEEK_API_KEY", super::TEST_KEY)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut pipe, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut daemon = Daemon { addr, config_path, child, notify, stderr, _dir: TempDir(dir) };
        let first = daemon.next_notification().await;
        assert!(first.contains("READY=1"), "first notification {first:?}; log:\n{}", daemon.stderr());
        daemon
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The next datagram sluice sent to the notify socket.
    pub async fn next_notification(&mut self) -> String {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(LIMIT, self.notify.recv(&mut buf)).await {
            Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            other => panic!("no notification from sluice ({other:?}); log:\n{}", self.stderr()),
        }
    }

    /// Everything sluice wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stderr holds `n` lines containing `needle`.
    pub async fn wait_log(&self, needle: &str, n: usize) -> bool {
        super::eventually(LIMIT, || self.stderr().lines().filter(|l| l.contains(needle)).count() >= n).await
    }

    /// Sends a signal by name ("HUP", "TERM").
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "sluice did not exit; log:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
