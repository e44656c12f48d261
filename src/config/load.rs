//! Layering the configuration: embedded defaults → TOML file → `SLUICE_<SECTION>__<KEY>` env → CLI flags,
//! then validation, then the API key (file, systemd credential, or `DEEPSEEK_API_KEY`).

use std::collections::HashMap;
use std::path::PathBuf;

use ::config::{Environment, File, FileFormat};

use super::{clients, AccountConfig, ApiKey, Config, ConfigError, Secret};

/// The environment variable that holds the API key when no key file is configured.
pub const API_KEY_ENV: &str = "DEEPSEEK_API_KEY";
/// The systemd credential name (`LoadCredential=deepseek-api-key:...`).
pub const CREDENTIAL_NAME: &str = "deepseek-api-key";

/// What the command line says, applied over file and env.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config PATH` / `SLUICE_CONFIG`.
    pub config_path: Option<PathBuf>,
    /// `--listen ADDR`.
    pub listen: Option<String>,
    /// `--upstream URL`.
    pub upstream: Option<String>,
}

/// Builds the effective config from all layers and validates it. `env` is the process environment
/// (passed in so tests need not touch the real one).
pub fn load(overrides: &Overrides, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    load_layers(overrides, env).map_err(|err| super::explain::explain(err, overrides, env))
}

fn load_layers(overrides: &Overrides, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let mut builder = ::config::Config::builder().add_source(::config::Config::try_from(&Config::default())?);
    if let Some(path) = &overrides.config_path {
        builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml).required(true));
    }
    builder = builder.add_source(
        Environment::with_prefix("SLUICE")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("retry.on_status")
            .source(Some(config_env(env))),
    );
    if let Some(listen) = &overrides.listen {
        builder = builder.set_override("server.listen", listen.as_str())?;
    }
    if let Some(upstream) = &overrides.upstream {
        builder = builder.set_override("upstream.base_url", upstream.as_str())?;
    }
    let mut config: Config = builder.build()?.try_deserialize()?;
    normalise_base_urls(&mut config);
    config.validate()?;
    if config.upstream.accounts.is_empty() {
        config.upstream.api_key = load_api_key(&config, env)?;
    } else {
        for account in &mut config.upstream.accounts {
            account.keys = load_account_keys(account, env)?;
        }
    }
    clients::load_tokens(&mut config.clients)?;
    super::fallback::load_keys(&mut config.fallbacks, env)?;
    if config.server.state_dir.is_none() {
        config.server.state_dir = env.get("STATE_DIRECTORY").filter(|d| !d.is_empty()).map(|d| {
            // systemd may list several directories, separated by colons: the first is sluice's.
            PathBuf::from(d.split(':').next().unwrap_or(d))
        });
    }
    if let Some(path) = &config.observe.admin_token_file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            what: "the admin token",
            path: path.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "observe.admin_token_file".into(),
                value: path.display().to_string(),
                expected: "a file holding a non-empty token".into(),
            });
        }
        config.observe.admin_token = Some(Secret::new(text.trim()));
    }
    Ok(config)
}

/// Base URLs without a trailing slash or a final `/v1`, with a note for each one changed.
fn normalise_base_urls(config: &mut Config) {
    let (url, note) = super::upstream::normalise_base_url("upstream.base_url", &config.upstream.base_url);
    config.upstream.base_url = url;
    config.notes.extend(note);
    for fallback in &mut config.fallbacks {
        if let Some(base) = &fallback.base_url {
            let key = format!("fallbacks ({:?}).base_url", fallback.name);
            let (url, note) = super::upstream::normalise_base_url(&key, base);
            fallback.base_url = Some(url);
            config.notes.extend(note);
        }
    }
}

/// Only `SLUICE_<SECTION>__<KEY>` variables are config keys; `SLUICE_CONFIG` and the like are not.
fn config_env(env: &HashMap<String, String>) -> ::config::Map<String, String> {
    env.iter()
        .filter(|(key, _)| key.strip_prefix("SLUICE_").is_some_and(|rest| rest.contains("__")))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// Finds the API key: `upstream.api_key_file`, else `$CREDENTIALS_DIRECTORY/deepseek-api-key` (systemd),
/// else `DEEPSEEK_API_KEY`. None of them: the client's own `Authorization` is passed through.
pub fn load_api_key(config: &Config, env: &HashMap<String, String>) -> Result<Option<ApiKey>, ConfigError> {
    let credential = env.get("CREDENTIALS_DIRECTORY").map(|dir| PathBuf::from(dir).join(CREDENTIAL_NAME));
    let file = match (&config.upstream.api_key_file, credential) {
        (Some(path), _) => Some((path.clone(), "upstream.api_key_file")),
        (None, Some(path)) if path.exists() => Some((path, "$CREDENTIALS_DIRECTORY/deepseek-api-key")),
        _ => None,
    };
    if let Some((path, key)) = file {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            what: "the API key",
            path: path.clone(),
            source,
        })?;
        return ApiKey::new(&text, path.display().to_string()).map(Some).ok_or_else(|| ConfigError::Invalid {
            key: key.into(),
            value: path.display().to_string(),
            expected: "a file holding one non-empty API key of printable characters".into(),
        });
    }
    match env.get(API_KEY_ENV) {
        Some(raw) if !raw.trim().is_empty() => {
            ApiKey::new(raw, API_KEY_ENV).map(Some).ok_or_else(|| ConfigError::Invalid {
                key: API_KEY_ENV.into(),
                value: "[redacted]".into(),
                expected: "an API key of printable characters".into(),
            })
        }
        _ => Ok(None),
    }
}

/// Reads an account's keys: `api_key_file`, `api_keys_file` (one per line), `api_key_env`, else the systemd
/// credential `$CREDENTIALS_DIRECTORY/<name>.key`. Errors name the account.
fn load_account_keys(account: &AccountConfig, env: &HashMap<String, String>) -> Result<Vec<ApiKey>, ConfigError> {
    let name = &account.name;
    let field = |f: &str| format!("upstream.accounts ({name:?}).{f}");
    let bad = |f: &str, value: String, expected: &str| ConfigError::Invalid {
        key: field(f),
        value,
        expected: expected.into(),
    };
    let read = |path: &PathBuf, f: &str| {
        std::fs::read_to_string(path)
            .map_err(|err| bad(f, path.display().to_string(), &format!("a readable file (reading it: {err})")))
    };
    if let Some(path) = &account.api_key_file {
        let key = ApiKey::new(&read(path, "api_key_file")?, format!("{}", path.display()));
        return key.map(|k| vec![k]).ok_or_else(|| {
            bad("api_key_file", path.display().to_string(), "a file holding one non-empty key of printable characters")
        });
    }
    if let Some(path) = &account.api_keys_file {
        let text = read(path, "api_keys_file")?;
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        let keys: Option<Vec<ApiKey>> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| ApiKey::new(l, format!("{} line {}", path.display(), i + 1)))
            .collect();
        return match keys {
            Some(keys) if !keys.is_empty() => Ok(keys),
            _ => Err(bad("api_keys_file", path.display().to_string(), "a file of keys, one per line, at least one")),
        };
    }
    if let Some(var) = &account.api_key_env {
        let raw = env.get(var).map(String::as_str).unwrap_or("");
        return ApiKey::new(raw, format!("${var}"))
            .map(|k| vec![k])
            .ok_or_else(|| bad("api_key_env", var.clone(), "an environment variable holding the account's key"));
    }
    let credential = env.get("CREDENTIALS_DIRECTORY").map(|dir| PathBuf::from(dir).join(format!("{name}.key")));
    match credential.filter(|path| path.exists()) {
        Some(path) => {
            let key = ApiKey::new(&read(&path, "key")?, format!("{}", path.display()));
            key.map(|k| vec![k]).ok_or_else(|| bad("key", path.display().to_string(), "a non-empty key"))
        }
        None => Err(bad(
            "api_key_file",
            "no key".into(),
            "a key source: api_key_file, api_keys_file, api_key_env, or the systemd credential <name>.key",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-config-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn no_sources_gives_the_embedded_defaults() {
        assert_eq!(load(&Overrides::default(), &env(&[])).unwrap(), Config::default());
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let file = temp_file(
            "layers.toml",
            "[server]\nlisten = \"127.0.0.1:9000\"\nmax_body_bytes = 1000\n[queue]\nmax_wait = \"90s\"\n\
             [limits.models.\"my-model\"]\nmax_concurrency = 7\n",
        );
        let overrides = Overrides {
            config_path: Some(file),
            listen: Some("127.0.0.1:9100".into()),
            upstream: Some("http://127.0.0.1:1234".into()),
        };
        let env = env(&[
            ("SLUICE_SERVER__MAX_BODY_BYTES", "2000"),
            ("SLUICE_RETRY__ON_STATUS", "429,503"),
            ("SLUICE_CONFIG", "ignored.toml"),
        ]);
        let config = load(&overrides, &env).unwrap();
        assert_eq!(config.server.listen.port(), 9100, "flag beats file");
        assert_eq!(config.server.max_body_bytes, 2000, "env beats file");
        assert_eq!(config.queue.max_wait, Duration::from_secs(90), "file beats defaults");
        assert_eq!(config.retry.on_status, vec![429, 503]);
        assert_eq!(config.upstream.base_url, "http://127.0.0.1:1234");
        assert_eq!(config.limits.models["my-model"].max_concurrency, 7);
        assert!(config.limits.models.contains_key("deepseek-v4-pro"), "models merge with the defaults");
    }

    #[test]
    fn unknown_keys_are_named() {
        let file = temp_file("unknown.toml", "[server]\nlisten_addr = \"127.0.0.1:1\"\n");
        let err = load(&Overrides { config_path: Some(file), ..Default::default() }, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");

        let err = load(&Overrides::default(), &env(&[("SLUICE_QUEUE__DEPTH", "5")])).unwrap_err();
        assert!(err.to_string().contains("depth"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let file = temp_file("bad.toml", "[upstream]\nheader_timeout = \"soon\"\n");
        let err = load(&Overrides { config_path: Some(file), ..Default::default() }, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("header_timeout"), "{err}");

        let err = load(&Overrides { listen: Some("nowhere".into()), ..Default::default() }, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn api_key_sources_in_order() {
        let key_file = temp_file("key", "sk-from-file\n");
        let cred_dir = temp_file(CREDENTIAL_NAME, "sk-from-credential").parent().unwrap().to_path_buf();
        let cred_dir = cred_dir.to_str().unwrap();

        let from_env = load(&Overrides::default(), &env(&[(API_KEY_ENV, "sk-env")])).unwrap();
        assert_eq!(from_env.upstream.api_key.unwrap().authorization(), "Bearer sk-env");

        let both = env(&[(API_KEY_ENV, "sk-env"), ("CREDENTIALS_DIRECTORY", cred_dir)]);
        let from_cred = load(&Overrides::default(), &both).unwrap();
        assert_eq!(from_cred.upstream.api_key.unwrap().authorization(), "Bearer sk-from-credential");

        let mut config = Config::default();
        config.upstream.api_key_file = Some(key_file);
        let from_file = load_api_key(&config, &both).unwrap().unwrap();
        assert_eq!(from_file.authorization(), "Bearer sk-from-file");

        assert!(load(&Overrides::default(), &env(&[])).unwrap().upstream.api_key.is_none());
    }

    #[test]
    fn empty_key_file_is_an_error() {
        let mut config = Config::default();
        config.upstream.api_key_file = Some(temp_file("empty-key", "\n"));
        let err = load_api_key(&config, &env(&[])).unwrap_err();
        assert!(err.to_string().contains("upstream.api_key_file"), "{err}");
    }

    fn account_config(text: &str, env_pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = temp_file(&format!("accounts-{}.toml", fastrand::u64(..)), text);
        load(&Overrides { config_path: Some(file), ..Default::default() }, &env(env_pairs))
    }

    #[test]
    fn accounts_read_their_keys_from_each_source() {
        let one = temp_file("team-a.key", "sk-a\n");
        let many = temp_file("team-b.keys", "# keys of team b\nsk-b1\n\nsk-b2\n");
        let creds = temp_file("team-d.key", "sk-d").parent().unwrap().to_path_buf();
        let text = format!(
            "[[upstream.accounts]]\nname = \"team-a\"\napi_key_file = {one:?}\nweight = 2\n\
             [upstream.accounts.models.\"deepseek-v4-pro\"]\nmax_concurrency = 50\n\
             [[upstream.accounts]]\nname = \"team-b\"\napi_keys_file = {many:?}\n\
             [[upstream.accounts]]\nname = \"team-c\"\napi_key_env = \"KEY_C\"\n\
             [[upstream.accounts]]\nname = \"team-d\"\n"
        );
        let config = account_config(
            &text,
            &[("KEY_C", "sk-c"), ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()), (API_KEY_ENV, "sk-ignored")],
        )
        .unwrap();
        let keys: Vec<Vec<String>> = config
            .upstream
            .accounts
            .iter()
            .map(|a| a.keys.iter().map(|k| k.authorization().to_str().unwrap().to_string()).collect())
            .collect();
        assert_eq!(
            keys,
            [vec!["Bearer sk-a"], vec!["Bearer sk-b1", "Bearer sk-b2"], vec!["Bearer sk-c"], vec!["Bearer sk-d"]]
        );
        assert_eq!(config.upstream.accounts[0].weight, 2);
        assert_eq!(config.upstream.accounts[0].models["deepseek-v4-pro"].max_concurrency, 50);
        assert!(config.upstream.api_key.is_none(), "with accounts, the single key is not used");
    }

    #[test]
    fn account_errors_name_the_account() {
        let dup = "[[upstream.accounts]]\nname = \"a\"\napi_key_env = \"K\"\n[[upstream.accounts]]\nname = \"a\"\napi_key_env = \"K\"\n";
        let err = account_config(dup, &[("K", "sk")]).unwrap_err().to_string();
        assert!(err.contains("\"a\"") && err.contains("no other account"), "{err}");
        let keyless = "[[upstream.accounts]]\nname = \"lonely\"\n";
        let err = account_config(keyless, &[]).unwrap_err().to_string();
        assert!(err.contains("lonely") && err.contains("api_key_file"), "{err}");
        let missing = "[[upstream.accounts]]\nname = \"gone\"\napi_key_file = \"/nonexistent/key\"\n";
        let err = account_config(missing, &[]).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/key") && err.contains("gone"), "{err}");
        let unset = "[[upstream.accounts]]\nname = \"envless\"\napi_key_env = \"NOPE\"\n";
        let err = account_config(unset, &[]).unwrap_err().to_string();
        assert!(err.contains("envless") && err.contains("NOPE"), "{err}");
        let bad_name = "[[upstream.accounts]]\nname = \"a b\"\napi_key_env = \"K\"\n";
        let err = account_config(bad_name, &[("K", "sk")]).unwrap_err().to_string();
        assert!(err.contains("a b"), "{err}");
    }
}
