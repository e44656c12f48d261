//! Unit tests of the learned limit: events in, limit out, virtual time.

use super::*;

const RTT: Duration = Duration::from_millis(100);

fn at(seq: u64, level: usize) -> Attempt {
    Attempt { seq, level, throttles_before: 0 }
}

/// Slow-starts `c` past `limit` with accepted attempts at its limit.
fn grow_to_at_least(c: &mut Controller, limit: usize, now: Instant) {
    let mut seq = 1000;
    while c.limit() < limit {
        c.accepted(now, at(seq, c.limit()), c.limit(), RTT);
        seq += 1;
    }
}

#[test]
fn a_fresh_lane_starts_modest_and_doubles_per_round_trip() {
    let now = Instant::now();
    let mut c = Controller::new(1, 500, now);
    assert_eq!(c.limit(), INITIAL_LIMIT);
    for seq in 0..8 {
        c.accepted(now + RTT, at(seq, 8), 8, RTT);
    }
    assert_eq!(c.limit(), 16, "one more per accepted attempt while the limit is used");
    assert!(c.slow_start());
    let mut idle = Controller::new(1, 500, now);
    idle.accepted(now + RTT, at(0, 1), 1, RTT);
    assert_eq!(idle.limit(), INITIAL_LIMIT, "no growth while the limit is not used");
}

#[test]
fn a_throttle_lowers_the_limit_to_what_the_upstream_holds() {
    let now = Instant::now();
    let mut c = Controller::new(1, 500, now);
    for seq in 0..32 {
        c.accepted(now, at(seq, 16), 16, RTT);
    }
    let grown = c.limit();
    assert!(grown > 30);
    assert_eq!(c.throttled(now, at(40, 21), 21, 41), Some(Change::Decreased { from: grown, to: 20 }));
    assert_eq!(c.throttled(now, at(41, 21), 20, 41), Some(Change::Decreased { from: 20, to: 19 }));
    assert!(!c.slow_start(), "a throttle ends slow start");
    // Accepted attempts at lower concurrency do not contradict it.
    c.accepted(now + RTT, at(42, 19), 19, RTT);
    assert_eq!(c.limit(), 19);
}

#[test]
fn throttling_that_does_not_fall_with_the_limit_is_set_aside() {
    let now = Instant::now();
    let mut c = Controller::new(1, 500, now);
    grow_to_at_least(&mut c, 20, now);
    let start = c.limit();
    // The top of a wave throttled: a descent begins.
    let mut seq = 2000;
    assert!(matches!(c.throttled(now, at(seq, start), start, seq + 1), Some(Change::Decreased { .. })));
    // After the decrease, attempts keep being throttled where others get through.
    let level = c.limit() - 5;
    let mut restored = None;
    for n in 0..20 {
        seq += 1;
        let change = if n % 3 == 2 {
            c.throttled(now, at(seq, level), level, seq + 1)
        } else {
            c.accepted(now, at(seq, level), level, RTT)
        };
        if let Some(Change::Restored { to }) = change {
            restored = Some(to);
            break;
        }
    }
    assert_eq!(restored, Some(start), "restored to where the descent began");
    assert!(c.slow_start(), "and growing per acceptance again");
    assert!(c.suspended(now));
    let limit = c.limit();
    assert_eq!(c.throttled(now, at(seq + 1, limit), limit, seq + 2), None, "suspended: throttles lower nothing");
    assert!(!c.suspended(now + SUSPEND));
}

#[test]
fn the_floor_and_the_ceiling_hold() {
    let now = Instant::now();
    let mut c = Controller::new(3, 10, now);
    for seq in 0..20 {
        c.throttled(now, at(seq, 1), 1, seq + 1);
    }
    assert_eq!(c.limit(), 3);
    for seq in 100..200 {
        c.accepted(now + Duration::from_secs(seq), at(seq, 10), 10, RTT);
    }
    assert!(c.limit() <= 10);
    c.set_bounds(1, 4);
    assert_eq!(c.limit(), 4, "a lowered ceiling (reload) applies at once");
}

#[test]
fn growth_after_a_throttle_waits_for_the_plateau() {
    let mut now = Instant::now();
    let mut c = Controller::new(1, 100, now);
    grow_to_at_least(&mut c, 12, now);
    c.released(now, Some(RTT));
    c.throttled(now, at(0, 11), 11, 1);
    assert_eq!(c.limit(), 10);
    let mut limits = vec![];
    for seq in 1..=u64::from(PLATEAU + 6) {
        now += RTT;
        c.accepted(now, at(seq, 10), c.limit(), RTT);
        c.released(now, Some(RTT));
        limits.push(c.limit());
    }
    let first_growth = limits.iter().position(|&l| l > 10).unwrap();
    assert!(first_growth as u32 >= PLATEAU - 1, "{limits:?}");
}

#[test]
fn no_growth_while_round_trips_triple() {
    let mut now = Instant::now();
    let mut c = Controller::new(1, 100, now);
    grow_to_at_least(&mut c, 12, now);
    c.released(now, Some(RTT));
    c.throttled(now, at(0, 11), 11, 1);
    for seq in 1..40 {
        now += RTT;
        let rtt = if seq < 3 { RTT } else { RTT * 3 };
        c.accepted(now, at(seq, 10), c.limit(), rtt);
    }
    assert_eq!(c.limit(), 10);
}

#[test]
fn recovery_after_probing_slow_starts_back() {
    let now = Instant::now();
    let mut c = Controller::new(1, 100, now);
    for seq in 0..12 {
        c.accepted(now, at(seq, 8), 8, RTT);
    }
    let before = c.limit();
    c.throttled(now, at(20, before), 1, 21);
    c.probing();
    assert_eq!(c.limit(), 1);
    let mut seq = 21;
    let mut later = now + Duration::from_secs(60);
    for _ in 0..5 {
        let limit = c.limit();
        for _ in 0..limit {
            c.accepted(later, at(seq, limit), limit, RTT);
            seq += 1;
        }
        later += RTT;
    }
    assert_eq!(c.limit(), before, "back where it was in a few round trips");
}

#[test]
fn idleness_earns_small_steps_back() {
    let now = Instant::now();
    let mut c = Controller::new(1, 100, now);
    c.throttled(now, at(0, 5), 5, 1);
    assert_eq!(c.limit(), 4);
    assert_eq!(c.dispatched(now + Duration::from_secs(30), 1), None, "not idle long enough");
    assert_eq!(c.dispatched(now + Duration::from_secs(30 + 180), 1), Some(Change::Increased { to: 7 }));
    assert_eq!(
        c.dispatched(now + Duration::from_secs(24 * 3600), 1),
        Some(Change::Increased { to: 14 }),
        "at most double"
    );
}
