//! The shipped config/sluice.toml is the documentation of every key: it must yield exactly the embedded
//! defaults and mention every key, and `sluice check-config` must accept it and never print a key.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use sluice::config::{load, Config, Overrides};

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/sluice.toml")
}

#[test]
fn the_shipped_file_yields_exactly_the_embedded_defaults() {
    let overrides = Overrides { config_path: Some(shipped()), ..Overrides::default() };
    assert_eq!(load(&overrides, &HashMap::new()).unwrap(), Config::default());
}

/// Every key path of a TOML value ("server.listen", "limits.models.deepseek-v4-pro.max_concurrency").
fn key_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    if let toml::Value::Table(table) = value {
        for (key, value) in table {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            key_paths(value, &path, out);
            out.push(path);
        }
    }
}

/// "# rate = \"600/min\"" → "rate = \"600/min\""; prose comments stay comments.
fn uncomment_example(line: &str) -> &str {
    match line.strip_prefix("# ") {
        Some(rest)
            if rest
                .split_once(" = ")
                .is_some_and(|(key, _)| key.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
        {
            rest
        }
        _ => line,
    }
}

#[test]
fn the_shipped_file_mentions_every_key() {
    let text = std::fs::read_to_string(shipped()).unwrap();
    // Optional keys (unset by default) are shown commented out; uncomment them to see every key.
    let uncommented: String = text.lines().map(uncomment_example).collect::<Vec<_>>().join("\n");
    let documented: toml::Value = toml::from_str(&uncommented).expect("the file with its examples uncommented parses");
    let mut documented_keys = Vec::new();
    key_paths(&documented, "", &mut documented_keys);

    let mut every = Config::default();
    every.limits.rate = Some("1/s".parse().unwrap());
    every.limits.burst = Some(1);
    every.upstream.api_key_file = Some("/x".into());
    every.observe.admin_token = Some(sluice::config::Secret::new("x"));
    every.observe.admin_token_file = Some("/x".into());
    every.server.state_dir = Some("/x".into());
    every.cache.redis_url = Some("redis://x".into());
    every.cluster.redis_url = Some("redis://x".into());
    every.upstream.proxy = Some(sluice::config::ProxyUrl::new("http://u:p@x:1"));
    every.upstream.ca_file = Some("/x".into());
    let all: toml::Value = toml::Value::try_from(&every).unwrap();
    let mut all_keys = Vec::new();
    key_paths(&all, "", &mut all_keys);
    for key in all_keys {
        assert!(documented_keys.contains(&key), "config/sluice.toml does not document `{key}`");
    }
}

#[test]
fn check_config_accepts_the_shipped_file_and_redacts_the_key() {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check-config", "--config"])
        .arg(shipped())
        .env("DEEPSEEK_API_KEY", "sk-very-secret-value")
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("[server]") && stdout.contains("listen = \"127.0.0.1:8787\""), "{stdout}");
    assert!(stdout.contains("[redacted]"), "{stdout}");
    assert!(!stdout.contains("sk-very-secret-value"), "the key was printed:\n{stdout}");
}

#[test]
fn check_config_names_a_bad_key_and_exits_64() {
    let dir = std::env::temp_dir().join(format!("sluice-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[queue]\nmax_wait = \"0s\"\n").unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_sluice")).args(["check-config", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("queue.max_wait"), "{stderr}");
}

#[test]
fn check_config_shows_the_proxy_without_its_credentials_and_names_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("sluice-check-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[upstream]\nproxy = \"http://alice:s3cret@proxy.corp:3128\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check-config", "--config"])
        .arg(&good)
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("proxy = \"http://[redacted]@proxy.corp:3128\""), "{stdout}");
    assert!(!stdout.contains("s3cret"), "{stdout}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[upstream]\nproxy = \"ftp://carol:pw@proxy.corp\"\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("upstream.proxy") && stderr.contains("http://proxy.corp:3128"), "{stderr}");
    assert!(!stderr.contains(":pw@"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_base_url_ending_in_v1_is_used_without_it_and_said_so() {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check-config", "--upstream", "https://api.deepseek.com/v1/"])
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("base_url = \"https://api.deepseek.com\"\n"), "{stdout}");
    assert!(stderr.contains("/v1/v1/") && stderr.contains("\"https://api.deepseek.com\""), "{stderr}");
}
