//! Log output: tracing-subscriber to stderr, text or JSON, filtered by `log.level` — and the writer
//! thread that formats and writes the one line per request off the request's path. The request hands
//! its finished record to a bounded channel (tokio's, used from plain threads: it takes room as lines
//! wait, not all of it up front); when the writer falls behind (a slow journald, a blocked
//! pipe), lines are dropped and counted (`sluice_log_lines_dropped_total`), never waited for. The
//! writer gathers what arrives for a moment and writes it with one call: a request costs neither a
//! write nor a wake-up of the writer of its own. The line itself is written by hand (`line_format.rs`).

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{Receiver, Sender};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::request_log::RequestLine;
use crate::config::{LogConfig, LogFormat};

/// Request lines that may wait for the writer thread (a few hundred bytes each, at most about 1.5 KB:
/// path and model are cut): a burst the writer catches up with is kept whole — a default queue of
/// 10,000 turned away at once among them; a writer stuck for longer loses lines, not memory or time.
pub const LINES_HELD: usize = 16_384;

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

/// Where formatted events go: the writer thread's batch; from any other thread, to the writer through
/// its channel (a stalled stderr never holds up a thread that serves requests), or straight to stderr
/// when there is no writer (before it starts, after the last flush) — whole events under stderr's lock,
/// so a line is never split by another thread's.
struct Output;

impl Write for Output {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.write_all(bytes).map(|()| bytes.len())
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if batch(bytes) || WRITER.get().is_some_and(|writer| writer.hand_over(bytes)) {
            Ok(())
        } else {
            std::io::stderr().lock().write_all(bytes)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Writes the batch gathered on this thread to `sink`, and empties it (back to its usual size).
fn write_batch(sink: &mut impl Write) {
    let _ = BATCH.try_with(|batch| {
        if let Ok(Some(batch)) = batch.try_borrow_mut().as_deref_mut() {
            // Nowhere left to say it if the sink fails: the lines are gone either way.
            let _ = sink.write_all(batch);
            batch.clear();
            batch.shrink_to(BATCH_BYTES);
        }
    });
}

/// Adds `bytes` to this thread's batch: true on the writer thread (should the batch be busy, false).
fn batch(bytes: &[u8]) -> bool {
    BATCH
        .try_with(|batch| match batch.try_borrow_mut().as_deref_mut() {
            Ok(Some(batch)) => {
                batch.extend_from_slice(bytes);
                true
            }
            _ => false,
        })
        .unwrap_or(false)
}

fn batch_len() -> usize {
    BATCH.try_with(|batch| batch.try_borrow().map_or(0, |batch| batch.as_ref().map_or(0, Vec::len))).unwrap_or(0)
}

enum Message {
    Line(Box<RequestLine>),
    /// Another event, formatted on the thread that emitted it.
    Event(Box<[u8]>),
    /// Answered once every line sent before it is written.
    Flush(mpsc::Sender<()>),
}

/// The request's end of the writer thread's channel.
struct LineWriter {
    sender: Sender<Message>,
    dropped: AtomicU64,
    /// Set by the last flush: from then on events go straight to stderr (nobody would write them).
    flushed: AtomicBool,
}

/// The writer, once started (`init_logging`); without it (tests, the library used alone) lines are
/// written where the request ends.
static WRITER: OnceLock<LineWriter> = OnceLock::new();

/// Installs the global subscriber and starts the request-line writer. `log.level` was validated with
/// the config, so parsing cannot fail here; should it anyway, `info` is used.
pub fn init_logging(config: &LogConfig) {
    let filter: Targets = config.level.parse().unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let result = tracing_subscriber::registry().with(filter).with(format_layer(config.format, || Output)).try_init();
    if let Err(err) = result {
        eprintln!("sluice: logging was already set up: {err}");
        return;
    }
    match LineWriter::start(LINES_HELD, config.format) {
        Ok(writer) => {
            let _ = WRITER.set(writer);
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot start the log writer thread: request lines are written inline")
        }
    }
}

/// The formatting layer of `format`, writing to `writer`: the one setup of the log's two formats.
pub(super) fn format_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => Box::new(layer.with_ansi(false)),
        LogFormat::Json => Box::new(layer.json().flatten_event(true)),
    }
}

impl LineWriter {
    fn start(held: usize, format: LogFormat) -> std::io::Result<Self> {
        let (sender, receiver) = tokio::sync::mpsc::channel(held);
        std::thread::Builder::new()
            .name("sluice-log".into())
            .spawn(move || write_lines(receiver, &mut std::io::stderr(), format))?;
        Ok(Self { sender, dropped: AtomicU64::new(0), flushed: AtomicBool::new(false) })
    }

    fn write(&self, line: RequestLine) {
        match self.sender.try_send(Message::Line(Box::new(line))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The thread is gone (it cannot end short of a bug): the line is written here instead.
            Err(TrySendError::Closed(Message::Line(line))) => line.emit(),
            Err(TrySendError::Closed(Message::Flush(_) | Message::Event(_))) => {}
        }
    }

    /// Hands a formatted event to the writer: true once it is taken or dropped (counted with the
    /// request lines), false when it should go straight out (the writer is gone or done).
    fn hand_over(&self, bytes: &[u8]) -> bool {
        if self.flushed.load(Ordering::Relaxed) {
            return false;
        }
        match self.sender.try_send(Message::Event(bytes.into())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Waits, at most `wait`, until every line handed over so far is written.
    fn flush(&self, wait: Duration) {
        let (done, written) = mpsc::channel();
        let deadline = std::time::Instant::now().checked_add(wait).unwrap_or_else(std::time::Instant::now);
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

/// Formats a request's line into this thread's batch, by hand in the log's `format`; through tracing
/// should the batch be busy (it cannot be, short of a bug).
fn format_line(line: &RequestLine, format: LogFormat) {
    let written = BATCH
        .try_with(|batch| match batch.try_borrow_mut().as_deref_mut() {
            Ok(Some(batch)) => !RequestLine::enabled() || line.write_to(format, SystemTime::now(), batch),
            _ => false,
        })
        .unwrap_or(false);
    if !written {
        line.emit();
    }
}

fn write_lines(mut receiver: Receiver<Message>, sink: &mut impl Write, format: LogFormat) {
    BATCH.with(|batch| *batch.borrow_mut() = Some(Vec::with_capacity(64 * 1024)));
    let mut drops = DropReport::default();
    // Idle, the writer blocks; once woken it takes whatever is there, writes it, and gathers again.
    while let Some(first) = receiver.blocking_recv() {
        let mut taken = 0_usize;
        let mut next = Some(first);
        while let Some(message) = next {
            taken += 1;
            match message {
                Message::Line(line) => format_line(&line, format),
                Message::Event(bytes) => {
                    batch(&bytes);
                }
                Message::Flush(done) => {
                    write_batch(sink);
                    let _ = done.send(());
                }
            }
            if batch_len() >= BATCH_BYTES {
                write_batch(sink);
            }
            next = receiver.try_recv().ok();
        }
        drops.tell(lines_dropped());
        write_batch(sink);
        // A burst (many requests ending together, a whole queue turned away): straight back for more.
        if taken < BURST {
            std::thread::sleep(GATHER);
        }
    }
    write_batch(sink);
}

/// A drain this long is a burst: the writer does not pause after it.
const BURST: usize = 512;

/// Says when lines were dropped: at most once per `DROPS_TOLD_EVERY`, with the count since last told.
#[derive(Default)]
struct DropReport {
    told: u64,
    at: Option<std::time::Instant>,
}

const DROPS_TOLD_EVERY: Duration = Duration::from_secs(10);

impl DropReport {
    fn tell(&mut self, dropped: u64) {
        let due = self.at.is_none_or(|at| at.elapsed() >= DROPS_TOLD_EVERY);
        if dropped > self.told && due {
            tracing::warn!(dropped = dropped - self.told, "log lines dropped: the log's reader fell behind");
            self.told = dropped;
            self.at = Some(std::time::Instant::now());
        }
    }
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
        writer.flushed.store(true, Ordering::Relaxed);
        let dropped = lines_dropped();
        if dropped > 0 {
            tracing::warn!(dropped, "log lines dropped since start: the log's reader fell behind");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn line() -> Message {
        Message::Line(Box::new(RequestLine::sample()))
    }

    #[test]
    fn a_writer_that_falls_behind_drops_and_counts_and_a_flush_waits_for_what_it_holds() {
        // A writer whose thread is held up: a channel of two, with no one reading yet.
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let writer = LineWriter { sender, dropped: AtomicU64::new(0), flushed: AtomicBool::new(false) };
        for _ in 0..5 {
            writer.write(RequestLine::sample());
        }
        assert_eq!(writer.dropped.load(Ordering::Relaxed), 3, "two held, three dropped, none waited for");
        // A flush with nobody reading gives up after its wait instead of hanging.
        let started = std::time::Instant::now();
        writer.flush(Duration::from_millis(200));
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(receiver);
        // The thread gone: the line is not counted as dropped (it is written inline).
        writer.write(RequestLine::sample());
        assert_eq!(writer.dropped.load(Ordering::Relaxed), 3);
    }

    /// What a writer (the writer thread, a subscriber) wrote, shared with the test.
    #[derive(Clone, Default)]
    pub(in crate::observe) struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::ErrorKind::Other)?.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        pub(in crate::observe) fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[test]
    fn the_writer_formats_lines_into_its_batch_and_a_flush_is_answered_after_they_are_written() {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let sink = Sink::default();
        let mut out = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(|| Output).with_ansi(false).finish();
        let writer = std::thread::spawn(move || {
            tracing::subscriber::with_default(subscriber, || write_lines(receiver, &mut out, LogFormat::Text));
        });
        for _ in 0..3 {
            sender.try_send(line()).unwrap();
        }
        let (done, written) = mpsc::channel();
        sender.try_send(Message::Flush(done)).map_err(|_| "full").unwrap();
        written.recv_timeout(Duration::from_secs(10)).unwrap();
        // Answered only once the three lines before it reached the sink.
        let text = sink.text();
        assert_eq!(text.matches(" request request_id=r ").count(), 3, "{text}");
        assert_eq!(text.lines().count(), 3, "{text}");
        drop(sender);
        writer.join().unwrap();
    }

    #[test]
    fn a_level_that_leaves_out_info_leaves_out_the_request_lines() {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let sink = Sink::default();
        let mut out = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(|| Output).with_max_level(tracing::Level::WARN).finish();
        let writer = std::thread::spawn(move || {
            tracing::subscriber::with_default(subscriber, || write_lines(receiver, &mut out, LogFormat::Json));
        });
        sender.try_send(line()).unwrap();
        let (done, written) = mpsc::channel();
        sender.try_send(Message::Flush(done)).map_err(|_| "full").unwrap();
        written.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(sink.text(), "", "written although the level is warn");
        drop(sender);
        writer.join().unwrap();
    }

    #[test]
    fn events_of_other_threads_reach_stderr_through_the_writer_until_its_last_flush() {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let writer = LineWriter { sender, dropped: AtomicU64::new(0), flushed: AtomicBool::new(false) };
        let sink = Sink::default();
        let mut out = sink.clone();
        let thread = std::thread::spawn(move || write_lines(receiver, &mut out, LogFormat::Text));
        assert!(writer.hand_over(b"an event\n"), "taken by the writer");
        writer.flush(Duration::from_secs(10));
        assert_eq!(sink.text(), "an event\n");
        writer.flushed.store(true, Ordering::Relaxed);
        assert!(!writer.hand_over(b"after the end\n"), "after the last flush an event goes straight out");
        drop(writer);
        thread.join().unwrap();
    }
}
