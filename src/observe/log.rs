//! Log output: tracing-subscriber to stderr, text or JSON, filtered by `log.level` — and the writer
//! thread that formats and writes the one line per request off the request's path. The request hands
//! its finished record to a bounded channel; when the writer falls behind (a slow journald, a blocked
//! pipe), lines are dropped and counted (`sluice_log_lines_dropped_total`), never waited for. The
//! writer gathers what arrives for a moment and writes it with one call: a request costs neither a
//! write nor a wake-up of the writer of its own.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use super::request_log::RequestLine;
use crate::config::{LogConfig, LogFormat};

/// Request lines that may wait for the writer thread (about 200 bytes each): a burst the writer
/// catches up with is kept whole; a writer stuck for longer loses lines rather than memory or time.
pub const LINES_HELD: usize = 8192;

/// How long a shutdown waits for the writer to write what it holds.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// How long the writer lets lines gather after writing a batch. Senders do not wake a sleeping
/// writer, so under load a line costs its request no system call at all; a line waits at most this.
const GATHER: Duration = Duration::from_millis(10);

/// A batch larger than this is written at once, mid-drain.
const BATCH_BYTES: usize = 256 * 1024;

thread_local! {
    /// On the writer thread: the lines formatted since the last write. Elsewhere: None (straight out).
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Where formatted events go: the writer thread's batch, or stderr from any other thread.
struct Output;

impl Write for Output {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let batched = BATCH.with(|batch| match batch.borrow_mut().as_mut() {
            Some(batch) => {
                batch.extend_from_slice(bytes);
                true
            }
            None => false,
        });
        if batched {
            Ok(bytes.len())
        } else {
            std::io::stderr().write(bytes)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Writes the batch gathered on this thread to stderr, and empties it.
fn write_batch() {
    BATCH.with(|batch| {
        if let Some(batch) = batch.borrow_mut().as_mut() {
            // Nowhere left to say it if stderr fails: the lines are gone either way.
            let _ = std::io::stderr().write_all(batch);
            batch.clear();
        }
    });
}

fn batch_len() -> usize {
    BATCH.with(|batch| batch.borrow().as_ref().map_or(0, Vec::len))
}

enum Message {
    Line(Box<RequestLine>),
    /// Answered once every line sent before it is written.
    Flush(mpsc::Sender<()>),
}

/// The request's end of the writer thread's channel.
struct LineWriter {
    sender: SyncSender<Message>,
    dropped: AtomicU64,
}

/// The writer, once started (`init_logging`); without it (tests, the library used alone) lines are
/// written where the request ends.
static WRITER: OnceLock<LineWriter> = OnceLock::new();

/// Installs the global subscriber and starts the request-line writer. `log.level` was validated with
/// the config, so parsing cannot fail here; should it anyway, `info` is used.
pub fn init_logging(config: &LogConfig) {
    let filter: Targets = config.level.parse().unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(|| Output);
    let result = match config.format {
        LogFormat::Text => registry.with(layer.with_ansi(false)).try_init(),
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
    };
    if let Err(err) = result {
        eprintln!("sluice: logging was already set up: {err}");
        return;
    }
    match LineWriter::start(LINES_HELD) {
        Ok(writer) => {
            let _ = WRITER.set(writer);
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot start the log writer thread: request lines are written inline")
        }
    }
}

impl LineWriter {
    fn start(held: usize) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::sync_channel(held);
        std::thread::Builder::new().name("sluice-log".into()).spawn(move || write_lines(&receiver))?;
        Ok(Self { sender, dropped: AtomicU64::new(0) })
    }

    fn write(&self, line: RequestLine) {
        match self.sender.try_send(Message::Line(Box::new(line))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The thread is gone (it cannot end short of a bug): the line is written here instead.
            Err(TrySendError::Disconnected(Message::Line(line))) => line.emit(),
            Err(TrySendError::Disconnected(Message::Flush(_))) => {}
        }
    }

    /// Waits, at most `wait`, until every line handed over so far is written.
    fn flush(&self, wait: Duration) {
        let (done, written) = mpsc::channel();
        let deadline = std::time::Instant::now() + wait;
        let mut message = Message::Flush(done);
        // A full channel: try again until the writer made room or the wait is over.
        loop {
            match self.sender.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

fn write_lines(receiver: &Receiver<Message>) {
    BATCH.with(|batch| *batch.borrow_mut() = Some(Vec::with_capacity(64 * 1024)));
    // Idle, the writer blocks; once woken it takes whatever is there, writes it, and gathers again.
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => line.emit(),
                Message::Flush(done) => {
                    write_batch();
                    let _ = done.send(());
                }
            }
            if batch_len() >= BATCH_BYTES {
                write_batch();
            }
            next = receiver.try_recv().ok();
        }
        write_batch();
        std::thread::sleep(GATHER);
    }
    write_batch();
}

/// Writes a request's line: on the writer thread when there is one, dropped and counted when its
/// channel is full.
pub(super) fn write_request_line(line: RequestLine) {
    match WRITER.get() {
        Some(writer) => writer.write(line),
        None => line.emit(),
    }
}

/// Request lines dropped because the writer fell behind.
pub fn lines_dropped() -> u64 {
    WRITER.get().map_or(0, |writer| writer.dropped.load(Ordering::Relaxed))
}

/// Waits (a bounded time) until every request line handed over so far is written: at shutdown.
pub fn flush_request_lines() {
    if let Some(writer) = WRITER.get() {
        writer.flush(FLUSH_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_that_falls_behind_drops_and_counts_and_a_flush_waits_for_what_it_holds() {
        // A writer whose thread is held up: a channel of two, with no one reading yet.
        let (sender, receiver) = mpsc::sync_channel(2);
        let writer = LineWriter { sender, dropped: AtomicU64::new(0) };
        for _ in 0..5 {
            writer.write(RequestLine::sample());
        }
        assert_eq!(writer.dropped.load(Ordering::Relaxed), 3, "two held, three dropped, none waited for");
        // The thread catches up: a flush returns once both held lines are written.
        let reader = std::thread::spawn(move || {
            let mut lines = 0;
            while let Ok(message) = receiver.recv() {
                match message {
                    Message::Line(_) => lines += 1,
                    Message::Flush(done) => {
                        let _ = done.send(());
                        return lines;
                    }
                }
            }
            lines
        });
        writer.flush(Duration::from_secs(10));
        assert_eq!(reader.join().ok(), Some(2));
        // The thread gone: a line is written inline, not counted as dropped; a flush returns at once.
        writer.write(RequestLine::sample());
        writer.flush(Duration::from_secs(10));
        assert_eq!(writer.dropped.load(Ordering::Relaxed), 3);
    }
}
