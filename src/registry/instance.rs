//! One registered instance: what was registered, its live health and
//! circuit state, and the tower stack that calls it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio_util::sync::CancellationToken;

use tokio::time::Instant;

use super::health::{Health, HealthStatus};
use super::validate::InstanceUrl;
use crate::breaker::{Breaker, CircuitBreaker, CircuitBreakerLayer};
use crate::upstream::{AttemptTimeout, AttemptTimeoutLayer, Pool, PoolService};

/// One instance's stack (SPEC §10): its circuit breaker over one attempt's
/// time limit over its connection pools. Built once, with the instance;
/// each attempt calls a clone, which costs reference counts only.
pub type InstanceStack = CircuitBreaker<AttemptTimeout<PoolService>>;

/// What was registered of an instance.
#[derive(Debug)]
pub(super) struct Registered {
    pub id: Arc<str>,
    pub service: Arc<str>,
    pub url: InstanceUrl,
    pub metadata: BTreeMap<String, String>,
    pub at: SystemTime,
    pub ttl: Option<Duration>,
}

#[derive(Debug)]
pub struct Instance {
    id: Arc<str>,
    /// `id` as the value of `x-switchyard-upstream`, made once.
    id_header: HeaderValue,
    service: Arc<str>,
    url: InstanceUrl,
    metadata: BTreeMap<String, String>,
    registered_at: SystemTime,
    /// The instance must renew within this long (SPEC §7).
    ttl: Option<Duration>,
    /// When its TTL runs out, in milliseconds since [`epoch`]; shared by
    /// every snapshot, like the live state below.
    deadline: Arc<AtomicU64>,
    /// Taken out of rotation by an operator: no new requests.
    draining: Arc<AtomicBool>,
    health: Arc<Health>,
    breaker: Arc<Breaker>,
    /// Calls the instance: the breaker above, over keep-alive connections
    /// in one pool per worker thread, so a connection is only ever used by
    /// the thread that drives it.
    stack: InstanceStack,
    /// Cancelled when the instance is removed or the gateway stops: ends its
    /// health checker.
    stop: CancellationToken,
}

impl Instance {
    pub(super) fn new(
        registered: Registered,
        breaker: Breaker,
        pools: Arc<[Arc<Pool>]>,
        stop: CancellationToken,
    ) -> Self {
        let Registered {
            id,
            service,
            url,
            metadata,
            at: registered_at,
            ttl,
        } = registered;
        let breaker = Arc::new(breaker);
        let stack = tower::ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(breaker.clone()))
            .layer(AttemptTimeoutLayer)
            .service(PoolService::new(pools));
        Self {
            // Ids are validated to header-safe characters at registration.
            id_header: HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("-")),
            id,
            service,
            url,
            metadata,
            registered_at,
            ttl,
            deadline: Arc::default(),
            draining: Arc::default(),
            health: Arc::default(),
            breaker,
            stack,
            stop,
        }
    }

    /// The same instance registered again with new metadata and TTL: live
    /// state and checker carry over.
    pub(super) fn with_registration(
        &self,
        metadata: BTreeMap<String, String>,
        ttl: Option<Duration>,
    ) -> Self {
        Self {
            id: self.id.clone(),
            id_header: self.id_header.clone(),
            service: self.service.clone(),
            url: self.url.clone(),
            metadata,
            registered_at: self.registered_at,
            ttl,
            deadline: self.deadline.clone(),
            draining: self.draining.clone(),
            health: self.health.clone(),
            breaker: self.breaker.clone(),
            stack: self.stack.clone(),
            stop: self.stop.clone(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn id_name(&self) -> &Arc<str> {
        &self.id
    }

    pub(super) fn service_name(&self) -> &Arc<str> {
        &self.service
    }

    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// Restarts the TTL from `now`; the new deadline, if it has a TTL.
    pub(super) fn renew(&self, now: Instant) -> Option<Instant> {
        let deadline = now + self.ttl?;
        let ms = deadline.saturating_duration_since(epoch()).as_millis() as u64;
        self.deadline.store(ms, Ordering::Relaxed);
        Some(deadline)
    }

    /// Whether its TTL has run out at `now`.
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.ttl.is_some()
            && epoch() + Duration::from_millis(self.deadline.load(Ordering::Relaxed)) <= now
    }

    /// Whether an operator took it out of rotation.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn id_header(&self) -> &HeaderValue {
        &self.id_header
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn url(&self) -> &InstanceUrl {
        &self.url
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn registered_at(&self) -> SystemTime {
        self.registered_at
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn status(&self) -> HealthStatus {
        self.health.status()
    }

    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// The stack that calls this instance.
    pub fn stack(&self) -> &InstanceStack {
        &self.stack
    }

    /// The current worker's pool of connections to this instance.
    pub fn pool(&self) -> &Arc<Pool> {
        self.stack.get_ref().get_ref().pool()
    }

    pub(super) fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }
}

/// The instant TTL deadlines are counted from: the first time one is asked.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}
