//! The gateway's shared state: configuration, registry, proxy, the
//! access log's switch, and the token that stops its background tasks.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessSwitch;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::registry::store::{self, StoreError};
use crate::registry::{HealthChecker, Registry};

pub struct Gateway {
    config: Arc<Config>,
    registry: Arc<Registry>,
    proxy: Proxy,
    metrics: Metrics,
    access: AccessSwitch,
    background: CancellationToken,
    /// One permit per client connection allowed (`limits.max_connections`).
    connection_slots: Arc<Semaphore>,
}

impl Gateway {
    /// Builds the gateway: opens the registry's store and loads what it
    /// holds, and registers the static `[[services]]`; their first health
    /// checks start at once, so this needs a Tokio runtime. `config` must
    /// have been validated. A store that cannot be opened or read is an
    /// error naming the file and the problem: the gateway never starts
    /// empty in silence.
    pub async fn new(config: Config) -> Result<Arc<Self>, StoreError> {
        let access = AccessSwitch::new(config.log.access);
        Self::build(config, None, access).await
    }

    /// As [`Gateway::new`], with the proxy's random picks drawn from a
    /// generator seeded with `seed`, so a test can repeat them.
    pub async fn with_seed(config: Config, seed: u64) -> Result<Arc<Self>, StoreError> {
        let access = AccessSwitch::new(config.log.access);
        Self::build(config, Some(seed), access).await
    }

    /// As [`Gateway::new`], with the access log on while `access` is
    /// (rather than as `[log] access` says): the switch
    /// [`crate::log::Logging`] turns on and off at run time.
    pub async fn with_access_switch(
        config: Config,
        access: AccessSwitch,
    ) -> Result<Arc<Self>, StoreError> {
        Self::build(config, None, access).await
    }

    async fn build(
        config: Config,
        seed: Option<u64>,
        access: AccessSwitch,
    ) -> Result<Arc<Self>, StoreError> {
        let store = store::open(&config.registry).await?;
        let config = Arc::new(config);
        let background = CancellationToken::new();
        let checker = HealthChecker::new(background.clone());
        let registry = Arc::new(Registry::with_store(config.clone(), checker, store));
        let proxy = Proxy::new(&config, seed);
        let connection_slots = Arc::new(Semaphore::new(config.limits.max_connections as usize));
        let gateway = Arc::new(Self {
            config,
            registry,
            proxy,
            metrics: Metrics::new(),
            access,
            background,
            connection_slots,
        });
        if let Err(e) = gateway.registry.start().await {
            gateway.stop_background();
            return Err(e);
        }
        Ok(gateway)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether `/call` requests are logged, one line each.
    pub fn access_switch(&self) -> &AccessSwitch {
        &self.access
    }

    /// The client-connection permits every worker's accept loop takes from.
    pub fn connection_slots(&self) -> &Arc<Semaphore> {
        &self.connection_slots
    }

    /// Stops every health checker; the server calls it on shutdown.
    pub fn stop_background(&self) {
        self.background.cancel();
    }
}
