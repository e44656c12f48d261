//! Reading an account's balance: `GET /user/balance` with one of its keys, bounded in time and size, and
//! parsing DeepSeek's answer (`{"is_available": bool, "balance_infos": [{"currency", "total_balance"}]}`,
//! the amounts as decimal strings).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;

use super::accounts::{Balance, BalanceInfo};
use super::Upstream;

/// The path of the balance endpoint (below `upstream.base_url`).
pub const BALANCE_PATH: &str = "/user/balance";
/// A balance answer larger than this is not read.
const MAX_BODY: usize = 64 * 1024;
/// A balance read that takes longer is abandoned (and tried again at the next poll).
const READ_TIME: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
struct Answer {
    is_available: bool,
    #[serde(default)]
    balance_infos: Vec<Info>,
}

#[derive(Deserialize)]
struct Info {
    #[serde(default)]
    currency: String,
    #[serde(default)]
    total_balance: Amount,
}

/// An amount, as DeepSeek sends it (a decimal string) or as a number.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Amount {
    Text(String),
    Number(f64),
    #[default]
    Missing,
}

impl Amount {
    fn value(&self) -> f64 {
        match self {
            Amount::Text(text) => text.trim().parse().unwrap_or(0.0),
            Amount::Number(n) => *n,
            Amount::Missing => 0.0,
        }
    }
}

/// Parses a balance answer.
pub fn parse(body: &[u8]) -> Option<Balance> {
    let answer: Answer = serde_json::from_slice(body).ok()?;
    let infos = answer
        .balance_infos
        .into_iter()
        .filter(|i| !i.currency.is_empty() && i.currency.len() <= 8)
        .map(|i| BalanceInfo { total: i.total_balance.value(), currency: i.currency })
        .filter(|i| i.total.is_finite())
        .take(8)
        .collect();
    Some(Balance { available: answer.is_available, infos })
}

/// Reads an account's balance with `key`.
pub async fn read(upstream: &Upstream, key: HeaderValue) -> Result<Balance, String> {
    let uri = upstream.target(BALANCE_PATH).ok_or("the balance URL cannot be built")?;
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    request.headers_mut().insert(http::header::AUTHORIZATION, key);
    request.headers_mut().insert(http::header::ACCEPT, HeaderValue::from_static("application/json"));
    let read = async {
        let response = upstream.send(request).await.map_err(|err| err.to_string())?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY).collect().await.map_err(|err| err.to_string())?;
        if !status.is_success() {
            return Err(format!("the balance endpoint answered {status}"));
        }
        parse(&body.to_bytes()).ok_or_else(|| "the balance answer could not be read".to_string())
    };
    tokio::time::timeout(READ_TIME, read).await.map_err(|_| "the balance read took too long".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepseeks_answer_is_read() {
        let body = br#"{"is_available":true,"balance_infos":[{"currency":"CNY","total_balance":"110.00",
            "granted_balance":"10.00","topped_up_balance":"100.00"},{"currency":"USD","total_balance":3.5}]}"#;
        let balance = parse(body).unwrap();
        assert!(balance.available);
        assert_eq!(balance.infos.len(), 2);
        assert_eq!((balance.infos[0].currency.as_str(), balance.infos[0].total), ("CNY", 110.0));
        assert_eq!(balance.infos[1].total, 3.5);
    }

    #[test]
    fn odd_answers_do_not_break_it() {
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(br#"{"balance_infos":[]}"#), None, "is_available is required");
        let odd = parse(
            br#"{"is_available":false,"balance_infos":[{"currency":"","total_balance":"x"},
            {"currency":"CNY","total_balance":"NaN?"}]}"#,
        )
        .unwrap();
        assert!(!odd.available);
        assert_eq!(odd.infos.len(), 1, "a nameless currency is dropped");
        assert_eq!(odd.infos[0].total, 0.0);
    }
}
