//! Config errors a newcomer can act on: each names where the bad value came from — the file, the
//! environment variable or the flag — echoes the value when the parser did not, and shows what a valid
//! one looks like.

use std::collections::HashMap;

use super::load::Overrides;
use super::ConfigError;

/// `err` with its origin, the value and an example added (errors without a key pass unchanged).
pub fn explain(err: ConfigError, overrides: &Overrides, env: &HashMap<String, String>) -> ConfigError {
    let message = err.to_string();
    let Some(key) = key_of(&err, &message) else { return err };
    let (origin, value) = origin_of(&key, overrides, env);
    let mut text = message;
    // Validation errors show their value already (a secret's redacted); the loader's may not.
    let secret = ["token", "key", "proxy", "redis_url"].iter().any(|s| key.contains(s));
    if let Some(value) = value.filter(|v| matches!(err, ConfigError::Load(_)) && !secret && !text.contains(v.as_str()))
    {
        text.push_str(&format!(": {value:?}"));
    }
    if let Some(example) = example_for(&key, &text) {
        text.push_str(&format!(" — valid: {example}"));
    }
    ConfigError::Located { message: text, origin }
}

/// The key an error is about: named by validation, or in the loader's "for key `…`".
fn key_of(err: &ConfigError, message: &str) -> Option<String> {
    match err {
        ConfigError::Invalid { key, .. } => Some(key.clone()),
        ConfigError::Load(_) => {
            let rest = &message[message.find("for key `")? + "for key `".len()..];
            Some(rest[..rest.find('`')?].to_string())
        }
        _ => None,
    }
}

/// Where `key` was set, and to what: the flag, the environment, the file, else the embedded defaults.
fn origin_of(key: &str, overrides: &Overrides, env: &HashMap<String, String>) -> (String, Option<String>) {
    let flag = match key {
        "server.listen" => overrides.listen.as_ref().map(|v| ("--listen", v)),
        "upstream.base_url" => overrides.upstream.as_ref().map(|v| ("--upstream", v)),
        _ => None,
    };
    if let Some((flag, value)) = flag {
        return (format!("flag {flag}"), Some(value.clone()));
    }
    let path: Vec<&str> = key.split('.').map(|part| part.split('[').next().unwrap_or(part)).collect();
    let var = format!("SLUICE_{}", path.join("__").to_uppercase());
    if let Some(value) = env.get(&var) {
        return (format!("environment {var}"), Some(value.clone()));
    }
    if let Some(file) = &overrides.config_path {
        let parsed = std::fs::read_to_string(file).ok().and_then(|text| text.parse::<toml::Table>().ok());
        if let Some(table) = parsed {
            let found = lookup(&table, &path);
            if found.is_some() || path.first().is_some_and(|section| table.contains_key(*section)) {
                let scalar = found.filter(|v| !v.is_table() && !v.is_array());
                let value = scalar.map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
                return (format!("file {}", file.display()), value);
            }
        }
    }
    ("the embedded defaults".into(), None)
}

fn lookup<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(*first)?;
    match (rest.is_empty(), value) {
        (true, value) => Some(value),
        (false, toml::Value::Table(inner)) => lookup(inner, rest),
        _ => None,
    }
}

/// What a valid value of `key` looks like, judged by the error and the key.
fn example_for(key: &str, message: &str) -> Option<&'static str> {
    let examples = [
        (message.contains("expected a duration"), "a duration such as \"500ms\", \"30s\", \"5m\" or \"1h\""),
        (
            message.contains("socket address"),
            "an IP address and port such as \"127.0.0.1:8787\" or \"[::1]:8787\" (not a host name such as localhost)",
        ),
        (key == "limits.rate", "a rate such as \"600/min\", \"10/s\" or \"100/10s\""),
        (message.contains("expected an integer") || message.contains("expected u"), "a whole number such as 100"),
        (message.contains("expected a boolean"), "true or false"),
    ];
    examples.into_iter().find(|(applies, _)| *applies).map(|(_, example)| example)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_bad_duration_in_the_file_names_the_file_and_shows_valid_ones() {
        let dir = std::env::temp_dir().join(format!("sluice-explain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[queue]\nmax_wait = \"10 parsecs\"\n").unwrap();
        let overrides = Overrides { config_path: Some(file.clone()), ..Overrides::default() };
        let message = load(&overrides, &env(&[])).unwrap_err().to_string();
        assert!(message.contains("queue.max_wait") && message.contains("10 parsecs"), "{message}");
        assert!(message.contains("\"500ms\"") && message.contains("\"5m\""), "{message}");
        assert!(message.contains(&format!("(from file {})", file.display())), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_listen_flag_echoes_the_value_and_an_example() {
        let overrides = Overrides { listen: Some("localhost".into()), ..Overrides::default() };
        let message = load(&overrides, &env(&[])).unwrap_err().to_string();
        assert!(message.contains("server.listen") && message.contains("\"localhost\""), "{message}");
        assert!(message.contains("127.0.0.1:8787") && message.contains("(from flag --listen)"), "{message}");
    }

    #[test]
    fn a_bad_environment_value_names_the_variable() {
        let message = load(&Overrides::default(), &env(&[("SLUICE_QUEUE__MAX_WAIT", "0s")])).unwrap_err().to_string();
        assert!(message.contains("(from environment SLUICE_QUEUE__MAX_WAIT)"), "{message}");
        let message = load(&Overrides::default(), &env(&[("SLUICE_LIMITS__RATE", "fast")])).unwrap_err().to_string();
        assert!(message.contains("\"600/min\"") && message.contains("SLUICE_LIMITS__RATE"), "{message}");
    }
}
