//! A reloaded configuration, applied to the registry (SPEC §9 "Reload").
//!
//! [`Registry::prepare`] checks what could refuse the new configuration
//! before anything changes: its static services under its own upstream
//! networks. [`Registry::reconfigure`] then applies it through the
//! registry's writer, in a batch of its own, so a registration either comes
//! before the whole of it or after, and a service or instance created
//! afterwards takes the new policy. Applying it:
//!
//! - gives each service a new snapshot with its new policy, each
//!   instance's breaker the new thresholds (its state stays) and each
//!   service's retry budget its new ratio (what its window holds stays);
//!   health checks read the new settings at their next check, and a reload
//!   that shortens the interval cuts the wait already running;
//! - replaces the limits, the upstream networks and the pools' timeouts for
//!   every later registration and connection;
//! - registers the static services added, deregisters those removed, and
//!   replaces an instance whose URL changed: in memory only, as at start,
//!   since they are the configuration's and never the store's. An id that
//!   a registration of its own holds (from the API or the store) is left
//!   to it, as at start.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::store::Record;
use super::validate::InstanceUrl;
use super::writer::{Apply, Write, Written};
use super::{Registration, Registry, record_of, static_registrations};
use crate::config::Config;
use crate::error::GatewayError;
use crate::upstream::PoolSettings;

/// A configuration checked against the registry, ready to apply.
#[derive(Debug)]
pub struct Reconfiguration {
    config: Arc<Config>,
    pool_settings: Arc<PoolSettings>,
    /// The static instances of `config`.
    statics: Vec<Record>,
}

/// A static instance's `(service, id)`.
type Key = (String, String);

impl Registry {
    /// Checks `config` (validated) against the registry: every static
    /// service URL must be inside its upstream networks. Changes nothing;
    /// the error names the service.
    pub fn prepare(&self, config: Arc<Config>) -> Result<Reconfiguration, String> {
        let pool_settings = Arc::new(self.pool_settings.load().reconfigured(&config));
        let statics = static_registrations(&config)
            .map(|registration| {
                record_of(&registration, &pool_settings.policy)
                    .map_err(|e| format!("static service {:?}: {e}", registration.name))
            })
            .collect::<Result<_, _>>()?;
        Ok(Reconfiguration {
            config,
            pool_settings,
            statics,
        })
    }

    /// Puts `reconfiguration` in force, in turn with the registry's writes.
    pub async fn reconfigure(
        self: &Arc<Self>,
        reconfiguration: Reconfiguration,
    ) -> Result<(), GatewayError> {
        self.write(Write::Reconfigure(Arc::new(reconfiguration)))
            .await
            .map(|_: Written| ())
    }

    /// The writer's part: see the module documentation.
    pub(super) fn apply_reconfiguration(&self, reconfiguration: &Reconfiguration) {
        let Reconfiguration {
            config,
            pool_settings,
            statics,
        } = reconfiguration;
        let old = self.config.swap(config.clone());
        self.pool_settings.store(pool_settings.clone());
        let default = Arc::new(config.policy_for(""));
        self.default_policy.store(default.clone());
        let services = self.services.pin();
        for service in self.services() {
            let policy = config
                .override_for(service.name())
                .map_or_else(|| default.clone(), Arc::new);
            let retry = &policy.retry;
            service
                .budget
                .set(retry.budget_ratio, retry.budget_min_per_sec);
            let service = service.reconfigured(policy);
            for instance in service.instances() {
                instance
                    .breaker()
                    .set_policy(&service.policy.circuit_breaker);
                // Cuts, pauses or resumes the wait for its next check as
                // the new interval says.
                self.checker
                    .watch(instance.clone(), service.live_policy.clone());
            }
            services.insert(service.name.clone(), Arc::new(service));
        }
        drop(services);
        self.apply_statics(&old, statics);
    }

    /// Makes the static instances `statics`, where `old` had its own.
    fn apply_statics(&self, old: &Config, statics: &[Record]) {
        let before: HashMap<Key, String> = static_registrations(old)
            .filter_map(|registration| static_key(&registration))
            .collect();
        let after: HashSet<Key> = statics
            .iter()
            .map(|r| (r.service.clone(), r.id.clone()))
            .collect();
        for ((service, id), url) in &before {
            let gone = !after.contains(&(service.clone(), id.clone()));
            let ours = self
                .find(service, id)
                .is_some_and(|i| i.url().as_str() == url);
            if gone && ours {
                self.apply(Apply::Remove {
                    service: service.as_str().into(),
                    id: id.as_str().into(),
                });
            }
        }
        for record in statics {
            let key = (record.service.clone(), record.id.clone());
            let created = match self.find(&record.service, &record.id) {
                None => true,
                Some(held) if held.url().as_str() == record.url => continue,
                // The old configuration's instance, at another URL.
                Some(held)
                    if before
                        .get(&key)
                        .is_some_and(|url| held.url().as_str() == url) =>
                {
                    false
                }
                // A registration of its own holds the id: it wins.
                Some(_) => continue,
            };
            self.apply(Apply::Put {
                record: record.clone(),
                created,
            });
        }
    }
}

/// The `(service, id)` and URL of a static registration, as a record of it
/// would have them.
fn static_key(registration: &Registration) -> Option<(Key, String)> {
    let url = InstanceUrl::parse(&registration.url).ok()?;
    Some((
        (registration.name.clone(), url.host_port().to_string()),
        url.as_str().to_string(),
    ))
}
