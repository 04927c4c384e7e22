//! The gateway's shared state: configuration, registry, upstream client, and
//! the token that stops its background tasks.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::GatewayError;
use crate::registry::{HealthChecker, Registry};
use crate::upstream::{self, UpstreamClient};

pub struct Gateway {
    config: Arc<Config>,
    registry: Registry,
    client: UpstreamClient,
    background: CancellationToken,
}

impl Gateway {
    /// Builds the gateway and registers the static `[[services]]`; their
    /// first health checks start at once, so this needs a Tokio runtime.
    /// `config` must have been validated.
    pub fn new(config: Config) -> Result<Arc<Self>, GatewayError> {
        let config = Arc::new(config);
        let client = upstream::client(&config.proxy);
        let background = CancellationToken::new();
        let checker = HealthChecker::new(client.clone(), background.clone());
        let registry = Registry::new(config.clone(), checker);
        let gateway = Arc::new(Self {
            config,
            registry,
            client,
            background,
        });
        if let Err(e) = gateway.registry.register_static() {
            gateway.stop_background();
            return Err(e);
        }
        Ok(gateway)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// Stops every health checker; the server calls it on shutdown.
    pub fn stop_background(&self) {
        self.background.cancel();
    }
}
