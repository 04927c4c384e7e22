//! Reloading the configuration while the gateway runs (SPEC §9 "Reload").
//!
//! SIGHUP makes the binary read its configuration again, the way it did at
//! start, and hand it to [`Gateway::reload`](crate::Gateway::reload). This
//! module holds what a reload decides before the gateway applies it: which
//! keys changed ([`changed_keys`]), which of them only a restart can change
//! ([`needs_restart`]), and the record of what reloads did ([`Reloads`]).
//!
//! What needs a restart, and why:
//!
//! - `gateway.listen`: the workers' sockets are bound at start;
//! - `gateway.workers`: each worker is a thread with its own event loop,
//!   and every instance has one connection pool per worker;
//! - `[registry]`: the store is opened, and the registry loaded from it,
//!   once; switching stores live would have to move every registration.
//!
//! Everything else applies live, to the requests, connections and checks
//! that start after the reload; those in flight finish under the settings
//! they started with. `gateway.name` is among them: a request looping back
//! through the gateway as the reload renames it is caught one round later,
//! under the new name.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use crate::config::Config;

/// The keys only a restart can change; a key is one of these or lies
/// under one (`registry.path` under `registry`).
const NEEDS_RESTART: &[&str] = &["gateway.listen", "gateway.workers", "registry"];

/// Whether the key `key` (as [`changed_keys`] names it) can change only
/// with a restart.
pub fn needs_restart(key: &str) -> bool {
    NEEDS_RESTART.iter().any(|fixed| {
        key.strip_prefix(fixed)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    })
}

/// The keys whose values differ between `old` and `new`, sorted: dotted
/// paths such as `limits.max_connections`; a static service is
/// `services[<name>]` when added or removed, and
/// `services[<name>].<key>` when changed.
pub fn changed_keys(old: &Config, new: &Config) -> Result<Vec<String>, String> {
    let (before, after) = (flatten(old)?, flatten(new)?);
    let mut changed = BTreeSet::new();
    for (key, value) in &before {
        if after.get(key) != Some(value) {
            changed.insert(key.clone());
        }
    }
    changed.extend(after.keys().filter(|k| !before.contains_key(*k)).cloned());
    // Serialized, the token is redacted: compared here instead.
    if old.gateway.admin_token != new.gateway.admin_token {
        changed.insert("gateway.admin_token".into());
    }
    let names =
        |c: &Config| -> BTreeSet<String> { c.services.iter().map(|s| s.name.clone()).collect() };
    let (old_names, new_names) = (names(old), names(new));
    for name in old_names.symmetric_difference(&new_names) {
        let whole = format!("services[{name}]");
        let under = format!("{whole}.");
        changed.retain(|key| !key.starts_with(&under));
        changed.insert(whole);
    }
    Ok(changed.into_iter().collect())
}

/// Every setting of `config` by its dotted key, the admin token left out.
fn flatten(config: &Config) -> Result<BTreeMap<String, toml::Value>, String> {
    let describe = |e: toml::ser::Error| format!("cannot compare the configurations: {e}");
    let mut table = toml::Table::try_from(config).map_err(describe)?;
    table.remove("services");
    let mut settings = BTreeMap::new();
    for (key, value) in table {
        flatten_into(key, value, &mut settings);
    }
    settings.remove("gateway.admin_token");
    for service in &config.services {
        let value = toml::Value::try_from(service).map_err(describe)?;
        flatten_into(format!("services[{}]", service.name), value, &mut settings);
    }
    Ok(settings)
}

fn flatten_into(key: String, value: toml::Value, settings: &mut BTreeMap<String, toml::Value>) {
    match value {
        toml::Value::Table(table) => {
            for (name, value) in table {
                flatten_into(format!("{key}.{name}"), value, settings);
            }
        }
        value => {
            settings.insert(key, value);
        }
    }
}

/// `new` with the settings that need a restart taken from `running`, so
/// that applying it changes none of them.
pub fn keep_restart_settings(new: &mut Config, running: &Config) {
    new.gateway.listen = running.gateway.listen;
    new.gateway.workers = running.gateway.workers;
    new.registry = running.registry.clone();
}

/// What one reload did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadReport {
    pub at: SystemTime,
    /// `Err` with why the configuration was refused; nothing of it was
    /// applied then.
    pub result: Result<(), String>,
    /// The keys changed and applied.
    pub applied: Vec<String>,
    /// The keys changed that only a restart applies; the running values stay.
    pub not_applied: Vec<String>,
}

impl ReloadReport {
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }

    /// A reload refused for `error`.
    pub fn failed(error: impl std::fmt::Display) -> Self {
        Self {
            at: SystemTime::now(),
            result: Err(error.to_string()),
            applied: Vec::new(),
            not_applied: Vec::new(),
        }
    }
}

/// The reloads a gateway has been through, for `/metrics` and the status
/// page: how many applied a configuration, how many were refused, and the
/// last one's report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reloads {
    pub succeeded: u64,
    pub failed: u64,
    pub last: Option<ReloadReport>,
}

impl Reloads {
    pub(crate) fn record(&mut self, report: ReloadReport) {
        if report.is_ok() {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
        self.last = Some(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).expect("valid")
    }

    fn changed(old: &str, new: &str) -> Vec<String> {
        changed_keys(&config(old), &config(new)).expect("comparable")
    }

    #[test]
    fn the_same_configuration_changes_nothing() {
        let text =
            "[retry]\nmax_attempts = 2\n[[services]]\nname = \"a\"\nurls = [\"http://h:1\"]\n";
        assert!(changed(text, text).is_empty());
        assert!(
            changed("", "[retry]\nmax_attempts = 3\n").is_empty(),
            "the default"
        );
    }

    #[test]
    fn changed_settings_are_named_by_their_keys() {
        assert_eq!(
            changed(
                "",
                "[limits]\nmax_connections = 5\n[circuit_breaker]\nreset_timeout = \"1s\"\n\
                 [upstreams]\ndeny = []\n[gateway]\nlisten = \"127.0.0.1:9\"\n"
            ),
            [
                "circuit_breaker.reset_timeout",
                "gateway.listen",
                "limits.max_connections",
                "upstreams.deny"
            ]
        );
        assert_eq!(
            changed("[retry]\n", "[retry]\nper_try_timeout = \"1s\"\n"),
            ["retry.per_try_timeout"],
            "a key set where it was unset"
        );
    }

    #[test]
    fn a_changed_token_is_seen_though_it_is_redacted() {
        let (mut old, mut new) = (Config::default(), Config::default());
        old.gateway.admin_token = "first".into();
        new.gateway.admin_token = "second".into();
        assert_eq!(changed_keys(&old, &new).unwrap(), ["gateway.admin_token"]);
        new.gateway.admin_token = String::new();
        assert_eq!(changed_keys(&old, &new).unwrap(), ["gateway.admin_token"]);
    }

    #[test]
    fn static_services_are_named_whole_when_added_or_removed() {
        let a = "[[services]]\nname = \"a\"\nurls = [\"http://h:1\"]\n";
        let b = "[[services]]\nname = \"b\"\nurls = [\"http://h:2\"]\n";
        assert_eq!(changed(a, b), ["services[a]", "services[b]"]);
        let a2 = "[[services]]\nname = \"a\"\nurls = [\"http://h:9\"]\n\
                  [services.circuit_breaker]\nfailure_threshold = 9\n";
        assert_eq!(
            changed(a, a2),
            [
                "services[a].circuit_breaker.failure_threshold",
                "services[a].circuit_breaker.half_open_max_requests",
                "services[a].circuit_breaker.reset_timeout",
                "services[a].urls"
            ],
            "an override section set whole, inherited keys included"
        );
    }

    #[test]
    fn listen_workers_and_the_store_need_a_restart() {
        for key in [
            "gateway.listen",
            "gateway.workers",
            "registry.store",
            "registry.path",
            "registry.endpoints",
        ] {
            assert!(needs_restart(key), "{key}");
        }
        for key in [
            "gateway.name",
            "gateway.admin_token",
            "gateway.listener",
            "registry_x",
            "limits.max_connections",
            "services[registry]",
            "log.format",
        ] {
            assert!(!needs_restart(key), "{key}");
        }
    }

    #[test]
    fn keeping_the_restart_settings_leaves_only_live_changes() {
        let running = config("[gateway]\nworkers = 2\n");
        let mut new = config(
            "[gateway]\nworkers = 4\nlisten = \"127.0.0.1:9\"\n[registry]\nstore = \"file\"\n\
             [limits]\nmax_connections = 5\n",
        );
        let keys = changed_keys(&running, &new).unwrap();
        assert_eq!(
            keys.iter().filter(|k| needs_restart(k)).count(),
            3,
            "{keys:?}"
        );
        keep_restart_settings(&mut new, &running);
        assert_eq!(
            changed_keys(&running, &new).unwrap(),
            ["limits.max_connections"]
        );
    }

    #[test]
    fn the_record_counts_each_kind_and_keeps_the_last() {
        let mut reloads = Reloads::default();
        reloads.record(ReloadReport {
            at: SystemTime::UNIX_EPOCH,
            result: Ok(()),
            applied: vec!["limits.max_connections".into()],
            not_applied: vec!["gateway.listen".into()],
        });
        reloads.record(ReloadReport::failed("bad file"));
        assert_eq!((reloads.succeeded, reloads.failed), (1, 1));
        let last = reloads.last.expect("a last reload");
        assert_eq!(last.result, Err("bad file".to_string()));
        assert!(last.not_applied.is_empty());
    }
}
