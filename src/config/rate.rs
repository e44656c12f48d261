//! The `limits.rate` value: "600/min", "10/s", "100/10s" — a count of requests per period.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A request rate: `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    /// How many requests a period allows (≥ 1).
    pub count: u32,
    /// The period they are spread over.
    pub period: Duration,
}

impl Rate {
    /// The steady spacing between two requests: `period / count`.
    pub fn interval(&self) -> Duration {
        self.period / self.count.max(1)
    }

    /// Requests per second, for display.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.period.as_secs_f64()
    }
}

/// Why a rate string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0} (expected COUNT/PERIOD such as \"600/min\", \"10/s\" or \"100/10s\")")]
pub struct RateParseError(String);

impl std::str::FromStr for Rate {
    type Err = RateParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (count, period) = s.split_once('/').ok_or_else(|| RateParseError(format!("no '/' in {s:?}")))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| RateParseError(format!("count {:?} is not a whole number", count.trim())))?;
        if count == 0 {
            return Err(RateParseError("count must be at least 1".into()));
        }
        let period = match period.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|e| RateParseError(format!("period {other:?}: {e}")))?,
        };
        if period.is_zero() {
            return Err(RateParseError("period must be longer than zero".into()));
        }
        if period > super::MAX_DURATION {
            return Err(RateParseError(format!("period {period:?} is longer than 7 days")));
        }
        if period / count < Duration::from_micros(1) {
            return Err(RateParseError("more than a million requests a second is no limit".into()));
        }
        Ok(Rate { count, period })
    }
}

impl TryFrom<String> for Rate {
    type Error = RateParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Rate> for String {
    fn from(r: Rate) -> String {
        r.to_string()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period.as_secs() {
            1 if self.period.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.period.subsec_nanos() == 0 => write!(f, "{}/min", self.count),
            3600 if self.period.subsec_nanos() == 0 => write!(f, "{}/hour", self.count),
            _ => write!(f, "{}/{}", self.count, humantime::format_duration(self.period)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_durations() {
        let cases = [
            ("600/min", 600, 60_000),
            ("10/s", 10, 1_000),
            ("5 / hour", 5, 3_600_000),
            ("100/10s", 100, 10_000),
            ("3/500ms", 3, 500),
        ];
        for (text, count, ms) in cases {
            let rate: Rate = text.parse().unwrap();
            assert_eq!(rate.count, count, "{text}");
            assert_eq!(rate.period, Duration::from_millis(ms), "{text}");
        }
    }

    #[test]
    fn refuses_nonsense() {
        for bad in ["", "600", "0/min", "x/min", "10/fortnight", "10/0s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["600/min", "10/s", "5/hour", "100/10s", "3/500ms"] {
            let rate: Rate = text.parse().unwrap();
            assert_eq!(rate.to_string().parse::<Rate>().unwrap(), rate);
        }
        assert_eq!("600/min".parse::<Rate>().unwrap().interval(), Duration::from_millis(100));
    }
}
