//! The cluster's share of `limits.rate`: the task reserves tokens on the GCRA kept in Redis (RATE in
//! `scripts.rs`) for the requests this instance could dispatch now, and hands them to admission
//! (`admission/tokens.rs`), which spends each at its moment.

use std::time::Duration;

use tokio::time::Instant;

use super::{millis, Session};
use crate::admission::{TOKENS_HELD, TOKEN_HORIZON, TOKEN_LIFE};

/// When this instance may next take tokens of the shared rate, and when it should look again.
#[derive(Default)]
pub struct RateTurn {
    not_before: Option<Instant>,
    pub next: Option<Instant>,
}

impl Session<'_> {
    /// Reserves tokens of `limits.rate` on the shared GCRA for the requests that could use one now (at
    /// most a burst, conforming within `TOKEN_HORIZON`), unless it said none could be reserved yet;
    /// `turn.next` is when to look again.
    pub(super) async fn take_tokens(&mut self, turn: &mut RateTurn) -> Result<(), redis::RedisError> {
        let now = Instant::now();
        turn.next = None;
        let Some((demand, usable)) = self.admission.rate_demand() else { return Ok(()) };
        if usable <= demand.left {
            return Ok(());
        }
        if let Some(at) = turn.not_before.filter(|at| *at > now) {
            turn.next = Some(at);
            return Ok(());
        }
        let interval = u64::try_from(demand.interval.as_micros()).unwrap_or(u64::MAX).max(1);
        // A burst, and what conforms within the horizon at the steady rate.
        let horizon_us = millis(TOKEN_HORIZON) * 1000;
        let horizon = u32::try_from(horizon_us.div_ceil(interval)).unwrap_or(u32::MAX);
        let wanted = (usable - demand.left)
            .min(demand.burst.saturating_add(horizon))
            .min(TOKENS_HELD.saturating_sub(demand.left));
        let mut invocation = self.scripts.rate.key(format!("{}:rate", self.settings.prefix));
        invocation.arg(interval).arg(demand.burst).arg(wanted).arg(horizon_us);
        self.count();
        let (taken, first_us, wait_us): (u32, i64, u64) = invocation.invoke_async(&mut self.connection).await?;
        self.admission.hand_over_tokens(taken, first_us, Duration::from_micros(interval));
        if taken < wanted {
            // Another could be reserved then; waiting half the horizon at least, the next reservation
            // takes several at once (what was reserved covers the wait) instead of one per round trip.
            let wait = Duration::from_micros(wait_us).clamp(TOKEN_HORIZON / 2, TOKEN_LIFE);
            turn.not_before = Some(now + wait);
            turn.next = turn.not_before;
        }
        Ok(())
    }
}
