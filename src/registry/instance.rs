//! One registered instance: what was registered, its live state (drain,
//! health, circuit), and the tower stack that calls it.
//!
//! The live state is shared by every snapshot of the instance (the registry
//! replaces its service's snapshot whole on each write, and a metadata
//! change makes a new `Instance` that must keep the old one's state): each
//! piece sits behind an `Arc`, and the pieces the proxy reads per request
//! (drain state, health status) are single atomics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use tokio::time::Instant;

use super::checker::Slot;
use super::health::{Health, HealthStatus};
use super::validate::InstanceUrl;
use crate::breaker::{Breaker, CircuitBreaker, CircuitBreakerLayer};
use crate::metrics::Attempts;
use crate::upstream::{AttemptTimeout, AttemptTimeoutLayer, Pool, PoolService};

/// One instance's stack (SPEC §10): its circuit breaker over one attempt's
/// time limit over its connection pools. Built once, with the instance;
/// each attempt calls a clone, which costs reference counts only.
pub type InstanceStack = CircuitBreaker<AttemptTimeout<PoolService>>;

/// Whether an instance takes new requests (SPEC §7 "Drain"): a draining
/// one gets none, while requests in flight finish and health checks go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    #[default]
    Active,
    Draining,
}

impl InstanceState {
    /// The state the store's `draining` flag stands for.
    pub fn of_draining(draining: bool) -> Self {
        if draining {
            Self::Draining
        } else {
            Self::Active
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
        }
    }

    /// `"active"` or `"draining"`, as the API and the store spell them.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "draining" => Some(Self::Draining),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> Self {
        if v == 1 { Self::Draining } else { Self::Active }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Active => 0,
            Self::Draining => 1,
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// Its TTL deadline, state and attempt counts, shared by every
    /// snapshot.
    live: Arc<Live>,
    health: Arc<Health>,
    breaker: Arc<Breaker>,
    /// Calls the instance: the breaker above, over keep-alive connections
    /// in one pool per worker thread, so a connection is only ever used by
    /// the thread that drives it.
    stack: InstanceStack,
    /// The gateway's, cancelled when it stops: ends the instance's checks.
    shutdown: CancellationToken,
}

/// What changes while an instance lives, shared by every snapshot of it:
/// one allocation an instance rather than one per counter.
#[derive(Debug, Default)]
struct Live {
    /// When its TTL runs out, in milliseconds since [`epoch`].
    deadline: AtomicU64,
    /// An [`InstanceState`]; the picker reads it with one atomic load.
    state: AtomicU8,
    /// Its attempts by outcome (`/metrics`).
    attempts: Attempts,
}

impl Instance {
    pub(super) fn new(
        registered: Registered,
        breaker: Breaker,
        pools: Arc<[Arc<Pool>]>,
        shutdown: CancellationToken,
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
            live: Arc::default(),
            health: Arc::default(),
            breaker,
            stack,
            shutdown,
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
            live: self.live.clone(),
            health: self.health.clone(),
            breaker: self.breaker.clone(),
            stack: self.stack.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn id_name(&self) -> &Arc<str> {
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
        self.live.deadline.store(ms, Ordering::Relaxed);
        Some(deadline)
    }

    /// Forgets its deadline; whether it had one (the TTL wheel then holds
    /// an entry to clear).
    pub(super) fn disarm(&self) -> bool {
        self.live.deadline.swap(0, Ordering::Relaxed) != 0
    }

    /// Whether its TTL has run out at `now`.
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.ttl.is_some()
            && epoch() + Duration::from_millis(self.live.deadline.load(Ordering::Relaxed)) <= now
    }

    /// Whether an operator took it out of rotation.
    pub fn is_draining(&self) -> bool {
        self.state() == InstanceState::Draining
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

    /// Active or draining.
    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.live.state.load(Ordering::Relaxed))
    }

    /// Sets the drain state, for this instance and every snapshot of it,
    /// and returns the previous one. A change is logged. A draining
    /// instance is skipped by the picker from the next request on; requests
    /// already sent to it finish.
    pub fn set_state(&self, state: InstanceState) -> InstanceState {
        let previous =
            InstanceState::from_u8(self.live.state.swap(state.to_u8(), Ordering::Relaxed));
        if previous != state {
            tracing::info!(
                service = %self.service,
                instance = %self.id,
                from = %previous,
                to = %state,
                "instance {state}"
            );
        }
        previous
    }

    /// Its attempts by outcome.
    pub fn attempts(&self) -> &Attempts {
        &self.live.attempts
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

    pub(super) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Whether its checks have stopped for good: it was removed (or
    /// replaced), or the gateway is stopping.
    pub(super) fn is_stopped(&self) -> bool {
        self.health.check_slot().is_removed() || self.shutdown.is_cancelled()
    }

    /// Where it stands in the health checks' schedule.
    pub(super) fn check_slot(&self) -> &Slot {
        self.health.check_slot()
    }
}

/// The instant TTL deadlines are counted from: the first time one is asked.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}
