//! The service registry: services by name, each with its instances.
//!
//! The proxy reads the registry on every request, so reads must never wait
//! for a writer or a health check. Services live in a lock-free concurrent
//! map (papaya, hashed with foldhash: seeded per process, and several
//! times faster than SipHash on short names), one O(1) lookup by name; each `ServiceEntry` is an immutable
//! snapshot of one service, replaced whole when its instances change.
//! Every change goes through one writer ([`writer`]), which commits it to
//! the registry's store ([`store`]: memory, or one crash-safe file) before
//! applying it here and acknowledging it; readers never wait for it. An
//! instance's live state (health, circuit, drain, TTL deadline) sits in
//! atomics and small mutexes of its own and is shared by every snapshot.
//! Instances registered with a TTL expire through one timer wheel
//! ([`expiry`]).
//!
//! A reload reaches the registry through the same writer
//! ([`reconfigure`]): every service gets a new snapshot with its new
//! policy, and the cell its instances' health checks read the policy from
//! is updated in place, as are the limits, the upstream networks and the
//! connection settings every pool reads.

mod checker;
mod expiry;
mod health;
mod instance;
mod reconfigure;
pub mod store;
pub mod validate;
mod writer;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::breaker::Breaker;
use crate::config::{Config, ServicePolicy};
use crate::error::{ErrorCode, GatewayError};
use crate::metrics::ServiceStats;
use crate::retry::RetryBudget;
use crate::upstream::policy::UpstreamPolicy;
use crate::upstream::{Pool, PoolSettings, SharedPoolSettings};
pub use checker::{HealthChecker, MAX_CONCURRENT_CHECKS};
use expiry::Expiry;
pub use health::{
    CheckResult, Flip, Health, HealthSnapshot, HealthStatus, HealthTracker, LastCheck,
};
pub use instance::{Instance, InstanceStack, InstanceState};
pub use reconfigure::Reconfiguration;
use store::{Change, Followed, Record, RegistryStore, StoreError};
use validate::InstanceUrl;
use writer::{Apply, Batch, Plan, Writer};
pub use writer::{Write, Written};

/// A service's policy as the configuration in force has it, for its
/// instances' health checks, which outlive any snapshot of the service:
/// one cell per service, replaced in place by a reload.
pub type LivePolicy = ArcSwap<ServicePolicy>;

/// One service as the proxy and the API see it at one moment.
#[derive(Debug)]
pub struct ServiceEntry {
    name: Arc<str>,
    /// The policy as of this snapshot: a request keeps the one it started
    /// with, whatever a reload does meanwhile.
    policy: Arc<ServicePolicy>,
    /// The same policy for the health checks; shared by every snapshot.
    live_policy: Arc<LivePolicy>,
    /// Shared by every snapshot of the service, like the live policy.
    budget: Arc<RetryBudget>,
    /// Its proxied requests (`/metrics`, the status page); shared likewise.
    stats: Arc<ServiceStats>,
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

    /// The service's proxied requests, by status and duration.
    pub fn stats(&self) -> &Arc<ServiceStats> {
        &self.stats
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
            live_policy: self.live_policy.clone(),
            budget: self.budget.clone(),
            stats: self.stats.clone(),
            instances,
        }
    }

    /// This snapshot under `policy`, which becomes the one its health
    /// checks read as well.
    fn reconfigured(&self, policy: Arc<ServicePolicy>) -> Self {
        self.live_policy.store(policy.clone());
        Self {
            name: self.name.clone(),
            policy,
            live_policy: self.live_policy.clone(),
            budget: self.budget.clone(),
            stats: self.stats.clone(),
            instances: self.instances.clone(),
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
    /// The instance must renew within this long, else it is removed.
    pub ttl: Option<Duration>,
}

/// What a registration did.
#[derive(Debug)]
pub enum Registered {
    /// A new `(service, id)`: 201.
    Created(Arc<Instance>),
    /// The same `(service, id)` again: 200. Metadata and TTL are replaced
    /// and the TTL renewed; a changed URL replaces the instance and its
    /// health and circuit start afresh. Drain state is kept.
    Existing(Arc<Instance>),
}

pub struct Registry {
    services: papaya::HashMap<Arc<str>, Arc<ServiceEntry>, foldhash::fast::RandomState>,
    instance_count: AtomicUsize,
    config: ArcSwap<Config>,
    /// The policy of every service without overrides, shared.
    default_policy: ArcSwap<ServicePolicy>,
    pool_settings: SharedPoolSettings,
    checker: HealthChecker,
    store: Box<dyn RegistryStore>,
    writer: Writer,
    expiry: Expiry,
    /// The TTL wheel's end, until [`Registry::start`] runs it.
    wheel: Mutex<Option<expiry::Wheel>>,
}

impl Registry {
    /// A registry kept in memory only.
    pub fn new(config: Arc<Config>, checker: HealthChecker) -> Self {
        Self::with_store(config, checker, Box::new(store::MemoryStore))
    }

    /// A registry whose writes go to `store`.
    pub fn with_store(
        config: Arc<Config>,
        checker: HealthChecker,
        store: Box<dyn RegistryStore>,
    ) -> Self {
        let (expiry, wheel) = Expiry::new();
        Self {
            services: papaya::HashMap::with_hasher(foldhash::fast::RandomState::default()),
            instance_count: AtomicUsize::new(0),
            pool_settings: Arc::new(ArcSwap::from_pointee(PoolSettings::new(
                &config,
                config.gateway.listen,
            ))),
            default_policy: ArcSwap::from_pointee(config.policy_for("")),
            config: ArcSwap::new(config),
            checker,
            store,
            writer: Writer::default(),
            expiry,
            wheel: Mutex::new(Some(wheel)),
        }
    }

    /// Loads what the store holds (every instance `unknown`, circuit
    /// `closed`, checked at once, TTLs running from now), registers the
    /// static `[[services]]` whose ids the store does not hold, and starts
    /// the TTL wheel. Call once, in a Tokio runtime.
    pub async fn start(self: &Arc<Self>) -> Result<usize, StoreError> {
        let records = self.store.load().await?;
        let loaded = records.len();
        let stored: HashSet<(String, String)> = records
            .iter()
            .map(|r| (r.service.clone(), r.id.clone()))
            .collect();
        let config = self.config.load_full();
        if loaded > config.limits.max_instances as usize {
            tracing::warn!(
                loaded,
                max_instances = config.limits.max_instances,
                "the store holds more instances than limits.max_instances: all are loaded"
            );
        }
        for record in records {
            if let Err(e) = InstanceUrl::parse(&record.url) {
                tracing::warn!(
                    service = record.service,
                    instance = record.id,
                    error = e,
                    "stored instance skipped: its URL is not valid"
                );
                continue;
            }
            self.apply(Apply::Put {
                record,
                created: true,
            });
        }
        if loaded > 0 {
            tracing::info!(instances = loaded, store = %self.store.describe(), "registry loaded");
        }
        for registration in static_registrations(&config) {
            let record = self
                .record_of(&registration)
                .map_err(|e| StoreError(e.to_string()))?;
            if stored.contains(&(record.service.clone(), record.id.clone())) {
                // The store's registration of this id wins.
                continue;
            }
            self.apply(Apply::Put {
                record,
                created: true,
            });
        }
        let wheel = self
            .wheel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(wheel) = wheel {
            let registry = Arc::downgrade(self);
            tokio::spawn(expiry::run(wheel, move |(service, id)| {
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = registry.write(Write::Expire { service, id }).await;
                });
            }));
        }
        if let Some(mut changes) = self.store.follow() {
            let registry = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some(followed) = changes.recv().await {
                    let Some(registry) = registry.upgrade() else {
                        return;
                    };
                    match followed {
                        Followed::Change(change) => {
                            let _ = registry.write(Write::Remote(change)).await;
                        }
                        Followed::Everything { records, done } => {
                            registry.catch_up(records).await;
                            if let Some(done) = done {
                                let _ = done.send(());
                            }
                        }
                    }
                }
            });
        }
        self.checker.start();
        if let Some(mut removals) = self.checker.take_removals() {
            let registry = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some((service, id)) = removals.recv().await {
                    let Some(registry) = registry.upgrade() else {
                        return;
                    };
                    // Failing removals (store down) come again at the next
                    // failing check.
                    let _ = registry.write(Write::RemoveUnhealthy { service, id }).await;
                }
            });
        }
        Ok(loaded)
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn checker(&self) -> &HealthChecker {
        &self.checker
    }

    /// What keeps the registrations, for logs (`memory`, `file <path>`).
    pub fn store_description(&self) -> String {
        self.store.describe()
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
    /// Makes the registry what the shared store holds, `records`: removes
    /// what it no longer holds and puts the rest (a put of an unchanged
    /// instance changes nothing that matters: health and circuit stay).
    async fn catch_up(self: &Arc<Self>, records: Vec<Record>) {
        let mut held: HashSet<(String, String)> = records
            .iter()
            .map(|r| (r.service.clone(), r.id.clone()))
            .collect();
        // The configuration's own services are this gateway's, not the
        // store's: they stay.
        held.extend(self.static_keys());
        let mut gone = Vec::new();
        for service in self.services() {
            for instance in service.instances() {
                let key = (instance.service().to_string(), instance.id().to_string());
                if !held.contains(&key) {
                    gone.push(key);
                }
            }
        }
        tracing::info!(
            instances = records.len(),
            removed = gone.len(),
            "registry caught up with the shared store"
        );
        for (service, id) in gone {
            let _ = self
                .write(Write::Remote(Change::Delete { service, id }))
                .await;
        }
        for record in records {
            let _ = self.write(Write::Remote(Change::Put(record))).await;
        }
    }

    /// The `(service, id)` of every static `[[services]]` instance.
    fn static_keys(&self) -> Vec<(String, String)> {
        static_registrations(&self.config.load())
            .filter_map(|registration| self.record_of(&registration).ok())
            .map(|record| (record.service, record.id))
            .collect()
    }

    /// Why the registry's store cannot be reached now, if it cannot.
    pub fn store_unreachable(&self) -> Option<String> {
        self.store.unreachable()
    }

    pub fn instance_count(&self) -> usize {
        self.instance_count.load(Ordering::Relaxed)
    }

    /// Adds an instance to the in-memory registry only, bypassing the
    /// store and the writer: for tests and benchmarks that build a
    /// registry by hand. The API goes through [`Registry::write`].
    pub fn register(&self, registration: Registration) -> Result<Registered, GatewayError> {
        match self.plan_register(&registration, &mut Batch::in_place()) {
            Plan::Do { apply, .. } => match self.apply(apply) {
                Written::Registered(registered) => Ok(registered),
                _ => Err(GatewayError::new(
                    ErrorCode::BadRequest,
                    "not a registration",
                )),
            },
            Plan::Refused(e) => Err(e),
            Plan::Later | Plan::Nothing => Err(GatewayError::new(
                ErrorCode::BadRequest,
                "not a registration",
            )),
        }
    }

    /// What `write` will do, checked against the registry as it is and the
    /// writes of `batch` before it.
    fn plan(&self, write: &Write, batch: &mut Batch) -> Plan {
        match write {
            Write::Register(registration) => self.plan_register(registration, batch),
            Write::Heartbeat { service, id } => {
                let Some(instance) = self.find(service, id) else {
                    return Plan::Refused(instance_not_found(service, id));
                };
                if !batch.claim(service, id) {
                    return Plan::Later;
                }
                let changes = match self.store.keeps_ttls() {
                    true => vec![Change::Renew {
                        service: service.clone(),
                        id: id.clone(),
                    }],
                    false => Vec::new(),
                };
                Plan::Do {
                    changes,
                    apply: Apply::Renew(instance),
                }
            }
            Write::SetState {
                service,
                id,
                draining,
            } => {
                let instance = match self.existing(service, id) {
                    Ok(instance) => instance,
                    Err(e) => return Plan::Refused(e),
                };
                if !batch.claim(service, id) {
                    return Plan::Later;
                }
                let mut record = Record::of(&instance);
                record.draining = *draining;
                Plan::Do {
                    changes: batch.keep(|| vec![Change::Put(record.clone())]),
                    apply: Apply::Drain(instance, record),
                }
            }
            Write::Remote(change) => self.plan_remote(change, batch),
            Write::Reconfigure(reconfiguration) => {
                if !batch.claim_all() {
                    return Plan::Later;
                }
                Plan::Do {
                    changes: Vec::new(),
                    apply: Apply::Reconfigure(reconfiguration.clone()),
                }
            }
            Write::RemoveInstance { service, id } => {
                let instance = match self.existing(service, id) {
                    Ok(instance) => instance,
                    Err(e) => return Plan::Refused(e),
                };
                if !batch.claim(service, id) {
                    return Plan::Later;
                }
                remove(&instance)
            }
            Write::RemoveService { service } => {
                let entry = match self.service(service) {
                    Ok(entry) => entry,
                    Err(e) => return Plan::Refused(e),
                };
                if !batch.claim_service(service) {
                    return Plan::Later;
                }
                Plan::Do {
                    changes: entry
                        .instances
                        .iter()
                        .map(|i| Change::Delete {
                            service: i.service().to_string(),
                            id: i.id().to_string(),
                        })
                        .collect(),
                    apply: Apply::RemoveService(entry.name.clone()),
                }
            }
            Write::Expire { service, id } => {
                let Some(instance) = self.find(service, id) else {
                    return Plan::Nothing;
                };
                if !batch.claim(service, id) {
                    return Plan::Later;
                }
                if !instance.expired(Instant::now()) {
                    // Renewed since the wheel fired.
                    return Plan::Nothing;
                }
                tracing::info!(service = %service, instance = %id, "instance expired: no heartbeat within its TTL");
                remove(&instance)
            }
            Write::RemoveUnhealthy { service, id } => {
                let Some(instance) = self.find(service, id) else {
                    return Plan::Nothing;
                };
                if !batch.claim(service, id) {
                    return Plan::Later;
                }
                let after = self
                    .get(service)
                    .map(|s| s.policy.health_check.deregister_after)
                    .unwrap_or_default();
                if after.is_zero()
                    || !instance
                        .health()
                        .unhealthy_for(after, std::time::SystemTime::now())
                {
                    return Plan::Nothing;
                }
                tracing::info!(
                    service = %service,
                    instance = %id,
                    after = %crate::config::fmt_duration(after),
                    "instance removed: unhealthy for deregister_after"
                );
                remove(&instance)
            }
        }
    }

    /// A change from the shared store: nothing to commit, and no limit
    /// applies (the gateway that took the write checked them). Its TTL is
    /// the shared store's to run (etcd leases).
    fn plan_remote(&self, change: &Change, batch: &mut Batch) -> Plan {
        match change {
            Change::Put(record) => {
                if InstanceUrl::parse(&record.url).is_err() {
                    tracing::warn!(
                        service = record.service,
                        instance = record.id,
                        "shared instance skipped: its URL is not valid"
                    );
                    return Plan::Nothing;
                }
                if !batch.claim(&record.service, &record.id) {
                    return Plan::Later;
                }
                let created = self.find(&record.service, &record.id).is_none();
                Plan::Do {
                    changes: Vec::new(),
                    apply: Apply::Put {
                        record: record.clone(),
                        created,
                    },
                }
            }
            Change::Renew { .. } => Plan::Nothing,
            Change::Delete { service, id } => {
                if self.find(service, id).is_none() {
                    return Plan::Nothing;
                }
                if !batch.claim(service, id) {
                    return Plan::Later;
                }
                Plan::Do {
                    changes: Vec::new(),
                    apply: Apply::Remove {
                        service: service.as_str().into(),
                        id: id.as_str().into(),
                    },
                }
            }
        }
    }

    fn plan_register(&self, registration: &Registration, batch: &mut Batch) -> Plan {
        let record = match self.record_of(registration) {
            Ok(record) => record,
            Err(e) => return Plan::Refused(e),
        };
        if !batch.claim(&record.service, &record.id) {
            return Plan::Later;
        }
        let current = self.get(&record.service);
        let existing = current
            .as_ref()
            .and_then(|s| s.instance(&record.id).ok().cloned());
        let record = match &existing {
            Some(old) => Record {
                registered_at_ms: if old.url().as_str() == record.url {
                    Record::of(old).registered_at_ms
                } else {
                    record.registered_at_ms
                },
                draining: old.is_draining(),
                ..record
            },
            None => {
                if let Err(e) = self.check_limits(&record.service, current.as_deref(), batch) {
                    return Plan::Refused(e);
                }
                batch.count_created(&record.service);
                record
            }
        };
        Plan::Do {
            changes: batch.keep(|| vec![Change::Put(record.clone())]),
            apply: Apply::Put {
                record,
                created: existing.is_none(),
            },
        }
    }

    /// The record a valid registration makes under the upstream networks
    /// in force; bad input is refused here, before anything changes.
    fn record_of(&self, registration: &Registration) -> Result<Record, GatewayError> {
        record_of(registration, &self.pool_settings.load().policy)
    }

    /// The instance, or the API's error for a missing service or instance.
    fn existing(&self, service: &str, id: &str) -> Result<Arc<Instance>, GatewayError> {
        self.service(service)?.instance(id).cloned()
    }

    fn find(&self, service: &str, id: &str) -> Option<Arc<Instance>> {
        self.get(service)?.instance(id).ok().cloned()
    }

    /// Applies a committed write to the in-memory registry.
    fn apply(&self, apply: Apply) -> Written {
        match apply {
            Apply::Put { record, created } => Written::Registered(self.apply_put(record, created)),
            Apply::Renew(instance) => {
                self.arm_ttl(&instance);
                Written::Instance(instance)
            }
            Apply::Drain(instance, record) => {
                instance.set_state(InstanceState::of_draining(record.draining));
                Written::Instance(instance)
            }
            Apply::Remove { service, id } => {
                self.apply_remove(&service, &id);
                Written::Removed
            }
            Apply::RemoveService(service) => {
                if let Some(entry) = self.services.pin().remove(&*service) {
                    for instance in &entry.instances {
                        self.forget(instance);
                    }
                }
                Written::Removed
            }
            Apply::Reconfigure(reconfiguration) => {
                self.apply_reconfiguration(&reconfiguration);
                Written::Reconfigured
            }
        }
    }

    fn apply_put(&self, record: Record, created: bool) -> Registered {
        let services = self.services.pin();
        let current = services.get(record.service.as_str()).cloned();
        let position = current
            .as_ref()
            .and_then(|s| s.instances.iter().position(|i| i.id() == record.id));
        let url = InstanceUrl::parse(&record.url).unwrap_or_else(|_| {
            // Records are made from validated registrations only.
            InstanceUrl::parse("http://invalid.invalid").expect("a valid URL")
        });

        if let (Some(service), Some(at)) = (&current, position) {
            let old = &service.instances[at];
            let url_changed = old.url() != &url;
            let instance = if url_changed {
                self.checker.forget(old);
                tracing::info!(
                    service = %record.service,
                    instance = %record.id,
                    from = old.url().as_str(),
                    to = url.as_str(),
                    "instance URL changed"
                );
                self.new_instance(service, &record, url)
            } else {
                Arc::new(old.with_registration(record.metadata.clone(), ttl_of(&record)))
            };
            instance.set_state(InstanceState::of_draining(record.draining));
            let mut instances = service.instances.clone();
            instances[at] = instance.clone();
            services.insert(
                service.name.clone(),
                Arc::new(service.with_instances(instances)),
            );
            self.arm_ttl(&instance);
            if url_changed {
                self.checker
                    .watch(instance.clone(), service.live_policy.clone());
            }
            return Registered::Existing(instance);
        }

        let service = current.unwrap_or_else(|| {
            let name: Arc<str> = record.service.as_str().into();
            let policy = match self.config.load().override_for(&name) {
                Some(policy) => Arc::new(policy),
                None => self.default_policy.load_full(),
            };
            let budget =
                RetryBudget::new(policy.retry.budget_ratio, policy.retry.budget_min_per_sec);
            Arc::new(ServiceEntry {
                live_policy: Arc::new(ArcSwap::new(policy.clone())),
                policy,
                budget: Arc::new(budget),
                stats: Arc::default(),
                name,
                instances: Vec::new(),
            })
        });
        let instance = self.new_instance(&service, &record, url);
        instance.set_state(InstanceState::of_draining(record.draining));
        let mut instances = Vec::with_capacity(service.instances.len() + 1);
        instances.extend(service.instances.iter().cloned());
        instances.push(instance.clone());
        services.insert(
            service.name.clone(),
            Arc::new(service.with_instances(instances)),
        );
        self.instance_count.fetch_add(1, Ordering::Relaxed);
        if created {
            tracing::info!(service = %record.service, instance = instance.id(), url = instance.url().as_str(), "instance registered");
        }
        self.arm_ttl(&instance);
        self.checker
            .watch(instance.clone(), service.live_policy.clone());
        Registered::Created(instance)
    }

    fn apply_remove(&self, name: &str, id: &str) {
        let services = self.services.pin();
        let Some(service) = services.get(name) else {
            return;
        };
        let Some(at) = service.instances.iter().position(|i| i.id() == id) else {
            return;
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
    }

    /// Starts (or renews) the instance's TTL, or clears it if it has none.
    fn arm_ttl(&self, instance: &Instance) {
        if self.store.keeps_ttls() {
            // The store removes it when its TTL runs out.
            return;
        }
        match instance.renew(Instant::now()) {
            Some(deadline) => {
                self.expiry
                    .set(instance.service_name(), instance.id_name(), deadline)
            }
            // Only a deadline once armed has an entry in the wheel: most
            // instances have none, and cost the wheel nothing.
            None if instance.disarm() => self
                .expiry
                .clear(instance.service_name(), instance.id_name()),
            None => {}
        }
    }

    fn forget(&self, instance: &Arc<Instance>) {
        self.checker.forget(instance);
        if instance.disarm() {
            self.expiry
                .clear(instance.service_name(), instance.id_name());
        }
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
        record: &Record,
        url: InstanceUrl,
    ) -> Arc<Instance> {
        let id: Arc<str> = record.id.as_str().into();
        let breaker = Breaker::new(
            &service.policy.circuit_breaker,
            service.name.clone(),
            id.clone(),
        );
        // One copy of the host for the instance's pools, not one each: a
        // large registry has a pool per instance and worker.
        let host: Arc<str> = url.host().into();
        let pools = (0..self.pool_settings.load().workers.max(1))
            .map(|_| {
                Arc::new(Pool::new(
                    host.clone(),
                    url.port(),
                    self.pool_settings.clone(),
                ))
            })
            .collect();
        let registered = instance::Registered {
            id,
            service: service.name.clone(),
            url,
            metadata: record.metadata.clone(),
            at: std::time::UNIX_EPOCH + Duration::from_millis(record.registered_at_ms),
            ttl: ttl_of(record),
        };
        Arc::new(Instance::new(
            registered,
            breaker,
            pools,
            self.checker.shutdown_token(),
        ))
    }

    fn check_limits(
        &self,
        name: &str,
        service: Option<&ServiceEntry>,
        batch: &Batch,
    ) -> Result<(), GatewayError> {
        let config = self.config.load();
        let limits = &config.limits;
        if self.instance_count() + batch.created >= limits.max_instances as usize {
            return Err(GatewayError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the registry holds its limit of {} instances",
                    limits.max_instances
                ),
            ));
        }
        let in_service = service.map_or(0, |s| s.instances.len())
            + batch.created_in.get(name).copied().unwrap_or(0);
        if in_service >= limits.max_instances_per_service as usize {
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
}

impl Record {
    /// The record of `instance` as it is.
    pub fn of(instance: &Instance) -> Self {
        Self {
            service: instance.service().to_string(),
            id: instance.id().to_string(),
            url: instance.url().as_str().to_string(),
            metadata: instance.metadata().clone(),
            registered_at_ms: unix_ms(instance.registered_at()),
            ttl_ms: instance.ttl().map(|t| t.as_millis() as u64),
            draining: instance.is_draining(),
        }
    }
}

/// The record a valid registration makes under the upstream networks of
/// `policy`; bad input is refused here, before anything changes.
fn record_of(registration: &Registration, policy: &UpstreamPolicy) -> Result<Record, GatewayError> {
    let Registration {
        name,
        url,
        id,
        metadata,
        ttl,
    } = registration;
    validate::service_name(name).map_err(|m| GatewayError::new(ErrorCode::InvalidName, m))?;
    let url = InstanceUrl::parse(url).map_err(|m| GatewayError::new(ErrorCode::InvalidUrl, m))?;
    let id = id.clone().unwrap_or_else(|| url.host_port().to_string());
    validate::instance_id(&id).map_err(|m| GatewayError::new(ErrorCode::InvalidName, m))?;
    policy.check_host(url.host(), url.port()).map_err(|why| {
        GatewayError::new(
            ErrorCode::UpstreamForbidden,
            format!("{} is outside the upstream policy: {why}", url.as_str()),
        )
    })?;
    Ok(Record {
        service: name.clone(),
        id,
        url: url.as_str().to_string(),
        metadata: metadata.clone(),
        registered_at_ms: unix_ms(std::time::SystemTime::now()),
        ttl_ms: ttl.map(|t| t.as_millis() as u64),
        draining: false,
    })
}

/// A registration of each URL of each static `[[services]]` entry.
fn static_registrations(config: &Config) -> impl Iterator<Item = Registration> + '_ {
    config.services.iter().flat_map(|service| {
        service.urls.iter().map(|url| Registration {
            name: service.name.clone(),
            url: url.clone(),
            ..Registration::default()
        })
    })
}

/// The plan that removes `instance`.
fn remove(instance: &Instance) -> Plan {
    Plan::Do {
        changes: vec![Change::Delete {
            service: instance.service().to_string(),
            id: instance.id().to_string(),
        }],
        apply: Apply::Remove {
            service: instance.service_name().clone(),
            id: instance.id_name().clone(),
        },
    }
}

fn ttl_of(record: &Record) -> Option<Duration> {
    record.ttl_ms.map(Duration::from_millis)
}

fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
        let r = Arc::new(r);
        r.write(Write::RemoveInstance {
            service: "a".into(),
            id: a.id().into(),
        })
        .await
        .unwrap();
        assert!(a.is_stopped());
        assert!(!b.is_stopped());
        shutdown.cancel();
        assert!(b.is_stopped());
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
        assert!(old.is_stopped());
        assert!(!new.is_stopped());
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

    /// A store that records every commit, and fails them when told to.
    #[derive(Default)]
    struct Recording {
        commits: std::sync::Mutex<Vec<Vec<Change>>>,
        failing: std::sync::atomic::AtomicBool,
        loaded: Vec<Record>,
    }

    impl RegistryStore for Arc<Recording> {
        fn describe(&self) -> String {
            "recording".into()
        }

        fn load(&self) -> store::StoreFuture<'_, Vec<Record>> {
            let loaded = self.loaded.clone();
            Box::pin(async move { Ok(loaded) })
        }

        fn commit(&self, changes: Vec<Change>) -> store::StoreFuture<'_, ()> {
            Box::pin(async move {
                if self.failing.load(Ordering::SeqCst) {
                    return Err(StoreError("disk full".into()));
                }
                self.commits.lock().unwrap().push(changes);
                Ok(())
            })
        }
    }

    fn recorded(toml: &str, store: &Arc<Recording>) -> Arc<Registry> {
        let config = Arc::new(Config::from_toml(toml).unwrap());
        let checker = HealthChecker::new(CancellationToken::new());
        Arc::new(Registry::with_store(
            config,
            checker,
            Box::new(store.clone()),
        ))
    }

    const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

    #[tokio::test]
    async fn concurrent_writes_share_commits_and_are_all_applied() {
        let store = Arc::new(Recording::default());
        let r = recorded(QUIET, &store);
        r.start().await.unwrap();
        let writes: Vec<_> = (0..50)
            .map(|i| {
                let r = r.clone();
                tokio::spawn(async move {
                    r.write(Write::Register(reg("a", &format!("http://h:{}", 1000 + i))))
                        .await
                })
            })
            .collect();
        for write in writes {
            assert!(matches!(
                write.await.unwrap().unwrap(),
                Written::Registered(Registered::Created(_))
            ));
        }
        assert_eq!(r.instance_count(), 50);
        let commits = store.commits.lock().unwrap();
        let puts: usize = commits.iter().map(Vec::len).sum();
        assert_eq!(puts, 50, "every registration committed once");
        assert!(
            commits.len() < 50,
            "some commits carried several: {}",
            commits.len()
        );
    }

    #[tokio::test]
    async fn a_failed_commit_refuses_the_write_and_changes_nothing() {
        let store = Arc::new(Recording::default());
        let r = recorded(QUIET, &store);
        r.start().await.unwrap();
        r.write(Write::Register(reg("a", "http://h:1")))
            .await
            .unwrap();
        store.failing.store(true, Ordering::SeqCst);
        let e = r
            .write(Write::Register(reg("a", "http://h:2")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::StoreUnavailable);
        let e = r
            .write(Write::RemoveInstance {
                service: "a".into(),
                id: "h:1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::StoreUnavailable);
        assert_eq!(r.get("a").unwrap().instances().len(), 1, "nothing applied");
        store.failing.store(false, Ordering::SeqCst);
        r.write(Write::Register(reg("a", "http://h:2")))
            .await
            .unwrap();
        assert_eq!(r.instance_count(), 2);
    }

    #[tokio::test]
    async fn writes_to_one_instance_in_one_batch_see_each_other() {
        let store = Arc::new(Recording::default());
        let r = recorded(
            "[limits]\nmax_instances = 2\nmax_instances_per_service = 2\n[health_check]\ninterval = \"0s\"",
            &store,
        );
        r.start().await.unwrap();
        // Queued together: they are planned as one run, in order.
        let (first, second, third, removed, fourth) = tokio::join!(
            r.write(Write::Register(reg("a", "http://h:1"))),
            r.write(Write::Register(reg("a", "http://h:1"))),
            r.write(Write::Register(reg("a", "http://h:2"))),
            r.write(Write::RemoveInstance {
                service: "a".into(),
                id: "h:1".into()
            }),
            r.write(Write::Register(reg("b", "http://h:3"))),
        );
        assert!(matches!(
            first.unwrap(),
            Written::Registered(Registered::Created(_))
        ));
        assert!(matches!(
            second.unwrap(),
            Written::Registered(Registered::Existing(_))
        ));
        assert!(matches!(
            third.unwrap(),
            Written::Registered(Registered::Created(_))
        ));
        assert!(matches!(removed.unwrap(), Written::Removed));
        // The limit of 2 counted the first two as they were created.
        assert_eq!(
            fourth.map(|_| ()).unwrap_err().code(),
            ErrorCode::LimitExceeded
        );
        assert_eq!(r.instance_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_instances_expire_unless_renewed() {
        let store = Arc::new(Recording::default());
        let r = recorded(QUIET, &store);
        r.start().await.unwrap();
        let ttl = Some(Duration::from_secs(10));
        for url in ["http://h:1", "http://h:2"] {
            r.write(Write::Register(Registration {
                ttl,
                ..reg("a", url)
            }))
            .await
            .unwrap();
        }
        r.write(Write::Register(reg("a", "http://h:3")))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        let renewed = r
            .write(Write::Heartbeat {
                service: "a".into(),
                id: "h:1".into(),
            })
            .await
            .unwrap();
        assert!(matches!(renewed, Written::Instance(_)));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let ids: Vec<_> = r
            .get("a")
            .unwrap()
            .instances()
            .iter()
            .map(|i| i.id().to_string())
            .collect();
        assert_eq!(
            ids,
            ["h:1", "h:3"],
            "h:2 expired at 10 s; h:1 was renewed; h:3 has no TTL"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        let ids: Vec<_> = r
            .get("a")
            .unwrap()
            .instances()
            .iter()
            .map(|i| i.id().to_string())
            .collect();
        assert_eq!(ids, ["h:3"]);
        let deletes = store
            .commits
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .filter(|c| matches!(c, Change::Delete { .. }))
            .count();
        assert_eq!(deletes, 2, "expiries are committed like removals");
        let e = r
            .write(Write::Heartbeat {
                service: "a".into(),
                id: "h:2".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::InstanceNotFound);
    }

    #[tokio::test]
    async fn drain_is_committed_applied_and_kept_by_a_new_registration() {
        let store = Arc::new(Recording::default());
        let r = recorded(QUIET, &store);
        r.start().await.unwrap();
        r.write(Write::Register(reg("a", "http://h:1")))
            .await
            .unwrap();
        r.write(Write::SetState {
            service: "a".into(),
            id: "h:1".into(),
            draining: true,
        })
        .await
        .unwrap();
        let instance = r.get("a").unwrap().instances()[0].clone();
        assert!(instance.is_draining());
        assert!(!crate::balance::routable(&instance, Instant::now()));
        r.write(Write::Register(reg("a", "http://h:1")))
            .await
            .unwrap();
        assert!(
            r.get("a").unwrap().instances()[0].is_draining(),
            "a heartbeat-style registration keeps the drain"
        );
        let last = store.commits.lock().unwrap().last().cloned().unwrap();
        assert!(matches!(&last[..], [Change::Put(record)] if record.draining));
    }

    #[tokio::test]
    async fn start_loads_the_store_and_merges_static_services() {
        let stored = |id: &str, url: &str| Record {
            service: "users".into(),
            id: id.into(),
            url: url.into(),
            metadata: [("v".to_string(), "2".to_string())].into(),
            registered_at_ms: 1_000,
            ttl_ms: None,
            draining: id == "a",
        };
        let store = Arc::new(Recording {
            loaded: vec![
                stored("a", "http://10.0.0.1:80"),
                stored("127.0.0.1:9", "http://10.0.0.9:80"),
            ],
            ..Recording::default()
        });
        let r = recorded(
            "[health_check]\ninterval = \"0s\"\n[[services]]\nname = \"users\"\nurls = [\"http://127.0.0.1:9\", \"http://127.0.0.1:10\"]",
            &store,
        );
        assert_eq!(r.start().await.unwrap(), 2);
        let users = r.get("users").unwrap();
        let view: Vec<_> = users
            .instances()
            .iter()
            .map(|i| {
                (
                    i.id().to_string(),
                    i.url().as_str().to_string(),
                    i.is_draining(),
                )
            })
            .collect();
        assert_eq!(
            view,
            [
                ("a".to_string(), "http://10.0.0.1:80".to_string(), true),
                (
                    "127.0.0.1:9".to_string(),
                    "http://10.0.0.9:80".to_string(),
                    false
                ),
                (
                    "127.0.0.1:10".to_string(),
                    "http://127.0.0.1:10".to_string(),
                    false
                ),
            ],
            "the store's URL wins for its id; the other static URL is added"
        );
        assert_eq!(users.instances()[0].metadata()["v"], "2");
        assert_eq!(
            users.instances()[0].registered_at(),
            std::time::UNIX_EPOCH + Duration::from_secs(1)
        );
        assert!(
            store.commits.lock().unwrap().is_empty(),
            "loading writes nothing"
        );
    }
}
