//! One registered instance: what was registered, plus its live health and
//! circuit state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use tokio_util::sync::CancellationToken;

use super::health::{Health, HealthStatus};
use super::validate::InstanceUrl;
use crate::breaker::Breaker;
use crate::upstream::Pool;

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
    /// Keep-alive connections to this instance, one pool per worker thread
    /// so a connection is only ever used by the thread that drives it.
    pools: Arc<[Arc<Pool>]>,
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
        Self {
            // Ids are validated to header-safe characters at registration.
            id_header: HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("-")),
            id,
            service,
            url,
            metadata,
            registered_at: SystemTime::now(),
            health: Arc::default(),
            breaker: Arc::new(breaker),
            pools,
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
            pools: self.pools.clone(),
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

    /// The current worker's pool of connections to this instance.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pools[crate::upstream::worker() % self.pools.len()]
    }

    pub(super) fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }
}
