//! The service registry: services by name, each with its instances.
//!
//! The proxy reads the registry on every request, so reads must never wait
//! for a writer or a health check. Services live in a lock-free concurrent
//! map (papaya, hashed with foldhash: seeded per process, and several
//! times faster than SipHash on short names), one O(1) lookup by name; each `ServiceEntry` is an immutable
//! snapshot of one service, replaced whole when its instances change.
//! Writers (registrations and removals, a few per second in practice) take
//! one mutex so that limits and service creation/removal stay consistent;
//! readers never touch it. An instance's live state (health, circuit) sits in
//! atomics and small mutexes of its own and is shared by every snapshot.

mod checker;
mod health;
mod instance;
pub mod validate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::breaker::Breaker;
use crate::config::{Config, ServicePolicy};
use crate::error::{ErrorCode, GatewayError};
use crate::retry::RetryBudget;
use crate::upstream::{Pool, PoolSettings};
pub use checker::{HealthChecker, MAX_CONCURRENT_CHECKS};
pub use health::{Flip, Health, HealthStatus, HealthTracker};
pub use instance::{Instance, InstanceStack};
use validate::InstanceUrl;

/// One service as the proxy and the API see it at one moment.
#[derive(Debug)]
pub struct ServiceEntry {
    name: Arc<str>,
    policy: Arc<ServicePolicy>,
    /// Shared by every snapshot of the service, like the policy.
    budget: Arc<RetryBudget>,
    instances: Vec<Arc<Instance>>,
}

impl ServiceEntry {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn policy(&self) -> &Arc<ServicePolicy> {
        &self.policy
    }

    /// The service's retry budget: every proxied request deposits, every
    /// retry withdraws.
    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// In registration order.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.instances
    }

    /// The instance `id`, or 404 `instance_not_found`.
    pub fn instance(&self, id: &str) -> Result<&Arc<Instance>, GatewayError> {
        self.instances
            .iter()
            .find(|i| i.id() == id)
            .ok_or_else(|| instance_not_found(&self.name, id))
    }

    /// Whether any instance would take a request now.
    pub fn has_routable(&self, now: Instant) -> bool {
        self.instances
            .iter()
            .any(|i| crate::balance::routable(i, now))
    }

    fn with_instances(&self, instances: Vec<Arc<Instance>>) -> Self {
        Self {
            name: self.name.clone(),
            policy: self.policy.clone(),
            budget: self.budget.clone(),
            instances,
        }
    }
}

/// A registration request, already parsed from JSON.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub name: String,
    pub url: String,
    pub id: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

/// What a registration did.
#[derive(Debug)]
pub enum Registered {
    /// A new `(service, id)`: 201.
    Created(Arc<Instance>),
    /// The same `(service, id)` again: 200. Metadata is replaced; a changed
    /// URL replaces the instance and its health and circuit start afresh.
    Existing(Arc<Instance>),
}

pub struct Registry {
    services: papaya::HashMap<Arc<str>, Arc<ServiceEntry>, foldhash::fast::RandomState>,
    writer: Mutex<()>,
    instance_count: AtomicUsize,
    config: Arc<Config>,
    /// The policy of every service without overrides, shared.
    default_policy: Arc<ServicePolicy>,
    pool_settings: Arc<PoolSettings>,
    checker: HealthChecker,
}

impl Registry {
    pub fn new(config: Arc<Config>, checker: HealthChecker) -> Self {
        Self {
            services: papaya::HashMap::with_hasher(foldhash::fast::RandomState::default()),
            writer: Mutex::new(()),
            instance_count: AtomicUsize::new(0),
            pool_settings: Arc::new(PoolSettings::new(&config, config.gateway.listen)),
            default_policy: Arc::new(config.policy_for("")),
            config,
            checker,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn checker(&self) -> &HealthChecker {
        &self.checker
    }

    /// The service named `name`, as of now. Never blocks.
    pub fn get(&self, name: &str) -> Option<Arc<ServiceEntry>> {
        self.services.pin().get(name).cloned()
    }

    /// The service named `name`, or 404 `service_not_found`.
    pub fn service(&self, name: &str) -> Result<Arc<ServiceEntry>, GatewayError> {
        self.get(name).ok_or_else(|| service_not_found(name))
    }

    /// Every service, sorted by name.
    pub fn services(&self) -> Vec<Arc<ServiceEntry>> {
        let mut all: Vec<_> = self.services.pin().values().cloned().collect();
        all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Instances registered, registry-wide.
    pub fn instance_count(&self) -> usize {
        self.instance_count.load(Ordering::Relaxed)
    }

    /// Registers the `[[services]]` of the configuration.
    pub fn register_static(&self) -> Result<(), GatewayError> {
        for service in &self.config.services {
            for url in &service.urls {
                self.register(Registration {
                    name: service.name.clone(),
                    url: url.clone(),
                    ..Registration::default()
                })?;
            }
        }
        Ok(())
    }

    /// Adds an instance, or refreshes it when `(name, id)` is known already.
    /// Bad input changes nothing.
    pub fn register(&self, registration: Registration) -> Result<Registered, GatewayError> {
        let Registration {
            name,
            url,
            id,
            metadata,
        } = registration;
        validate::service_name(&name).map_err(|m| GatewayError::new(ErrorCode::InvalidName, m))?;
        let url =
            InstanceUrl::parse(&url).map_err(|m| GatewayError::new(ErrorCode::InvalidUrl, m))?;
        let id = id.unwrap_or_else(|| url.host_port().to_string());
        validate::instance_id(&id).map_err(|m| GatewayError::new(ErrorCode::InvalidName, m))?;
        self.pool_settings
            .policy
            .check_host(url.host(), url.port())
            .map_err(|why| {
                GatewayError::new(
                    ErrorCode::UpstreamForbidden,
                    format!("{} is outside the upstream policy: {why}", url.as_str()),
                )
            })?;

        let _writer = self.lock_writer();
        let services = self.services.pin();
        let current = services.get(name.as_str()).cloned();
        let position = current
            .as_ref()
            .and_then(|s| s.instances.iter().position(|i| i.id() == id));

        if let (Some(service), Some(at)) = (&current, position) {
            let old = &service.instances[at];
            let url_changed = old.url() != &url;
            let instance = if url_changed {
                old.stop_token().cancel();
                tracing::info!(
                    service = %name,
                    instance = %id,
                    from = old.url().as_str(),
                    to = url.as_str(),
                    "instance URL changed"
                );
                self.new_instance(service, id.into(), url, metadata)
            } else {
                Arc::new(old.with_metadata(metadata))
            };
            let mut instances = service.instances.clone();
            instances[at] = instance.clone();
            services.insert(
                service.name.clone(),
                Arc::new(service.with_instances(instances)),
            );
            if url_changed {
                self.checker.watch(instance.clone(), service.policy.clone());
            }
            return Ok(Registered::Existing(instance));
        }

        self.check_limits(&name, current.as_deref())?;
        let service = current.unwrap_or_else(|| {
            let name: Arc<str> = name.as_str().into();
            let policy = match self.config.override_for(&name) {
                Some(policy) => Arc::new(policy),
                None => self.default_policy.clone(),
            };
            let budget =
                RetryBudget::new(policy.retry.budget_ratio, policy.retry.budget_min_per_sec);
            Arc::new(ServiceEntry {
                policy,
                budget: Arc::new(budget),
                name,
                instances: Vec::new(),
            })
        });
        let instance = self.new_instance(&service, id.into(), url, metadata);
        let mut instances = Vec::with_capacity(service.instances.len() + 1);
        instances.extend(service.instances.iter().cloned());
        instances.push(instance.clone());
        services.insert(
            service.name.clone(),
            Arc::new(service.with_instances(instances)),
        );
        self.instance_count.fetch_add(1, Ordering::Relaxed);
        tracing::info!(service = %name, instance = instance.id(), url = instance.url().as_str(), "instance registered");
        self.checker.watch(instance.clone(), service.policy.clone());
        Ok(Registered::Created(instance))
    }

    /// Removes one instance; a service left with none is removed too.
    pub fn remove_instance(&self, name: &str, id: &str) -> Result<(), GatewayError> {
        let _writer = self.lock_writer();
        let services = self.services.pin();
        let service = services.get(name).ok_or_else(|| service_not_found(name))?;
        let Some(at) = service.instances.iter().position(|i| i.id() == id) else {
            return Err(instance_not_found(name, id));
        };
        let mut instances = service.instances.clone();
        let removed = instances.remove(at);
        if instances.is_empty() {
            services.remove(name);
        } else {
            services.insert(
                service.name.clone(),
                Arc::new(service.with_instances(instances)),
            );
        }
        self.forget(&removed);
        Ok(())
    }

    /// Removes a service and all its instances.
    pub fn remove_service(&self, name: &str) -> Result<(), GatewayError> {
        let _writer = self.lock_writer();
        let services = self.services.pin();
        let service = services
            .remove(name)
            .ok_or_else(|| service_not_found(name))?;
        for instance in &service.instances {
            self.forget(instance);
        }
        Ok(())
    }

    fn forget(&self, instance: &Instance) {
        instance.stop_token().cancel();
        self.instance_count.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(
            service = instance.service(),
            instance = instance.id(),
            "instance removed"
        );
    }

    fn new_instance(
        &self,
        service: &ServiceEntry,
        id: Arc<str>,
        url: InstanceUrl,
        metadata: BTreeMap<String, String>,
    ) -> Arc<Instance> {
        let breaker = Breaker::new(
            &service.policy.circuit_breaker,
            service.name.clone(),
            id.clone(),
        );
        let pools = (0..self.pool_settings.workers.max(1))
            .map(|_| {
                Arc::new(Pool::new(
                    url.host(),
                    url.port(),
                    self.pool_settings.clone(),
                ))
            })
            .collect();
        Arc::new(Instance::new(
            id,
            service.name.clone(),
            url,
            metadata,
            breaker,
            pools,
            self.checker.stop_token(),
        ))
    }

    fn check_limits(&self, name: &str, service: Option<&ServiceEntry>) -> Result<(), GatewayError> {
        let limits = &self.config.limits;
        if self.instance_count() >= limits.max_instances as usize {
            return Err(GatewayError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the registry holds its limit of {} instances",
                    limits.max_instances
                ),
            ));
        }
        if service.is_some_and(|s| s.instances.len() >= limits.max_instances_per_service as usize) {
            return Err(GatewayError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "service {name:?} holds its limit of {} instances",
                    limits.max_instances_per_service
                ),
            ));
        }
        Ok(())
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is `()`: poisoning carries no meaning here.
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn instance_not_found(name: &str, id: &str) -> GatewayError {
    GatewayError::new(
        ErrorCode::InstanceNotFound,
        format!("service {name:?} has no instance {id:?}"),
    )
}

fn service_not_found(name: &str) -> GatewayError {
    GatewayError::new(
        ErrorCode::ServiceNotFound,
        format!("no service named {name:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    fn registry(toml: &str) -> (Registry, CancellationToken) {
        let config = Arc::new(Config::from_toml(toml).unwrap());
        let shutdown = CancellationToken::new();
        let checker = HealthChecker::new(shutdown.clone());
        (Registry::new(config, checker), shutdown)
    }

    fn reg(name: &str, url: &str) -> Registration {
        Registration {
            name: name.into(),
            url: url.into(),
            ..Registration::default()
        }
    }

    #[tokio::test]
    async fn limits_refuse_with_429_and_keep_what_exists() {
        let (r, _) = registry(
            "[limits]\nmax_instances = 3\nmax_instances_per_service = 2\n[health_check]\ninterval = \"0s\"",
        );
        r.register(reg("a", "http://h:1")).unwrap();
        r.register(reg("a", "http://h:2")).unwrap();
        let e = r.register(reg("a", "http://h:3")).unwrap_err();
        assert_eq!(e.code(), ErrorCode::LimitExceeded);
        // Re-registering a known instance is not a new one: still allowed.
        assert!(matches!(
            r.register(reg("a", "http://h:2")).unwrap(),
            Registered::Existing(_)
        ));
        r.register(reg("b", "http://h:1")).unwrap();
        let e = r.register(reg("c", "http://h:1")).unwrap_err();
        assert_eq!(e.code(), ErrorCode::LimitExceeded);
        assert_eq!(r.instance_count(), 3);
        assert_eq!(r.get("a").unwrap().instances().len(), 2);
        assert!(r.get("c").is_none());
    }

    #[tokio::test]
    async fn removal_and_shutdown_stop_the_checkers() {
        let (r, shutdown) = registry("[health_check]\ninterval = \"1h\"");
        let Registered::Created(a) = r.register(reg("a", "http://127.0.0.1:9")).unwrap() else {
            panic!("new instance");
        };
        let Registered::Created(b) = r.register(reg("b", "http://127.0.0.1:9")).unwrap() else {
            panic!("new instance");
        };
        r.remove_instance("a", a.id()).unwrap();
        assert!(a.stop_token().is_cancelled());
        assert!(!b.stop_token().is_cancelled());
        shutdown.cancel();
        assert!(b.stop_token().is_cancelled());
    }

    #[tokio::test]
    async fn a_changed_url_replaces_the_instance_and_its_checker() {
        let (r, _) = registry("[health_check]\ninterval = \"1h\"");
        let Registered::Created(old) = r
            .register(Registration {
                id: Some("x".into()),
                ..reg("a", "http://127.0.0.1:9")
            })
            .unwrap()
        else {
            panic!("new instance");
        };
        let Registered::Existing(new) = r
            .register(Registration {
                id: Some("x".into()),
                ..reg("a", "http://127.0.0.1:10")
            })
            .unwrap()
        else {
            panic!("same id");
        };
        assert!(old.stop_token().is_cancelled());
        assert!(!new.stop_token().is_cancelled());
        assert_eq!(r.instance_count(), 1);
    }

    #[test]
    fn lookups_are_by_name_and_lists_are_sorted() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (r, _) = registry("[health_check]\ninterval = \"0s\"");
        for name in ["zeta", "alpha", "mid"] {
            r.register(reg(name, "http://h:1")).unwrap();
        }
        let names: Vec<_> = r.services().iter().map(|s| s.name().to_string()).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        assert_eq!(r.get("mid").unwrap().name(), "mid");
        assert!(r.get("nope").is_none());
    }
}
