//! One registered instance: what was registered, its live health and
//! circuit state, and the tower stack that calls it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use tokio_util::sync::CancellationToken;

use super::health::{Health, HealthStatus};
use super::validate::InstanceUrl;
use crate::breaker::{Breaker, CircuitBreaker, CircuitBreakerLayer};
use crate::upstream::{AttemptTimeout, AttemptTimeoutLayer, Pool, PoolService};

/// One instance's stack (SPEC §10): its circuit breaker over one attempt's
/// time limit over its connection pools. Built once, with the instance;
/// each attempt calls a clone, which costs reference counts only.
pub type InstanceStack = CircuitBreaker<AttemptTimeout<PoolService>>;

#[derive(Debug)]
pub struct Instance {
    id: Arc<str>,
    /// `id` as the value of `x-switchyard-upstream`, made once.
    id_header: HeaderValue,
    service: Arc<str>,
    url: InstanceUrl,
    metadata: BTreeMap<String, String>,
    registered_at: SystemTime,
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
        id: Arc<str>,
        service: Arc<str>,
        url: InstanceUrl,
        metadata: BTreeMap<String, String>,
        breaker: Breaker,
        pools: Arc<[Arc<Pool>]>,
        stop: CancellationToken,
    ) -> Self {
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
            registered_at: SystemTime::now(),
            health: Arc::default(),
            breaker,
            stack,
            stop,
        }
    }

    /// The same instance with new metadata: live state and checker carry over.
    pub(super) fn with_metadata(&self, metadata: BTreeMap<String, String>) -> Self {
        Self {
            id: self.id.clone(),
            id_header: self.id_header.clone(),
            service: self.service.clone(),
            url: self.url.clone(),
            metadata,
            registered_at: self.registered_at,
            health: self.health.clone(),
            breaker: self.breaker.clone(),
            stack: self.stack.clone(),
            stop: self.stop.clone(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
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
