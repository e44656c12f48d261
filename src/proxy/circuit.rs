//! The primary's circuit, when fallbacks are configured. Closed, every request starts on the primary.
//! `OPEN_AFTER` failures in a row (a retried 5xx, a failed connection, a header or first-token timeout,
//! a body cut before it was complete — a 429 is an answer: its lane handles it) open it: for `OPEN_FOR`,
//! requests start on the first fallback. Then one request at a time goes to the primary as a probe (the
//! others still start on the fallback): an answer closes the circuit, a failure opens it for another
//! `OPEN_FOR`, a probe lost either way lets the next request probe. So a primary that recovers is
//! used again within `OPEN_FOR` plus one probe. A plain state machine fed with the time.

use std::time::Duration;

use tokio::time::Instant;

/// Failures in a row that open the circuit.
pub const OPEN_AFTER: u32 = 5;
/// How long an open circuit sends requests past the primary before it probes.
pub const OPEN_FOR: Duration = Duration::from_secs(10);
/// A probe that has not reported by then is taken as lost: the next request may probe.
const PROBE_LOST_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is on its way (since then).
    Probing {
        since: Instant,
    },
}

#[derive(Debug)]
pub struct Circuit {
    state: State,
}

impl Default for Circuit {
    fn default() -> Self {
        Self { state: State::Closed { failures: 0 } }
    }
}

/// Where a request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Primary,
    /// The circuit is half open: this request probes the primary.
    Probe,
    /// The circuit is open: start on the first fallback.
    Fallback,
}

impl Circuit {
    /// Where the next request starts.
    pub fn start(&mut self, now: Instant) -> Start {
        match self.state {
            State::Closed { .. } => Start::Primary,
            State::Open { until } if now < until => Start::Fallback,
            State::Probing { since } if now.duration_since(since) < PROBE_LOST_AFTER => Start::Fallback,
            State::Open { .. } | State::Probing { .. } => {
                self.state = State::Probing { since: now };
                Start::Probe
            }
        }
    }

    /// The primary answered (any response but a retried failure).
    pub fn success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    /// The primary failed an attempt.
    pub fn failure(&mut self, now: Instant) {
        self.state = match self.state {
            State::Closed { failures } if failures + 1 < OPEN_AFTER => State::Closed { failures: failures + 1 },
            State::Open { until } => State::Open { until },
            _ => State::Open { until: now + OPEN_FOR },
        };
    }

    /// A probe left without an answer either way: the next request may probe.
    pub fn probe_lost(&mut self, now: Instant) {
        if let State::Probing { .. } = self.state {
            self.state = State::Open { until: now };
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_probes_one_at_a_time_and_closes_on_success() {
        let mut circuit = Circuit::default();
        let now = Instant::now();
        for _ in 0..OPEN_AFTER - 1 {
            circuit.failure(now);
        }
        assert_eq!(circuit.start(now), Start::Primary, "not yet");
        circuit.success();
        for _ in 0..OPEN_AFTER - 1 {
            circuit.failure(now);
        }
        assert_eq!(circuit.start(now), Start::Primary, "a success reset the count");
        circuit.failure(now);
        assert_eq!(circuit.start(now), Start::Fallback, "open");
        let later = now + OPEN_FOR;
        assert_eq!(circuit.start(later), Start::Probe);
        assert_eq!(circuit.start(later), Start::Fallback, "one probe at a time");
        circuit.failure(later);
        assert_eq!(circuit.start(later + OPEN_FOR / 2), Start::Fallback, "the probe failed: open again");
        assert_eq!(circuit.start(later + OPEN_FOR), Start::Probe);
        circuit.success();
        assert_eq!(circuit.start(later + OPEN_FOR), Start::Primary, "closed");
        assert!(!circuit.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_does_not_keep_the_circuit_open_forever() {
        let mut circuit = Circuit::default();
        let now = Instant::now();
        for _ in 0..OPEN_AFTER {
            circuit.failure(now);
        }
        assert_eq!(circuit.start(now + OPEN_FOR), Start::Probe);
        assert_eq!(circuit.start(now + OPEN_FOR + PROBE_LOST_AFTER), Start::Probe, "its client went away");
        circuit.probe_lost(now + OPEN_FOR + PROBE_LOST_AFTER);
        assert_eq!(circuit.start(now + OPEN_FOR + PROBE_LOST_AFTER), Start::Probe, "a lost probe: another at once");
    }
}
