//! The gateway's shared state: configuration, registry, proxy, the access
//! log's switch, the token that stops its background tasks, and reloading the configuration.
//!
//! The configuration in force sits behind an [`ArcSwap`]: reading it takes
//! no lock, and a reload ([`Gateway::reload`]) swaps it whole. What other
//! parts copied out of it at start (the admin token, the proxy's settings,
//! the connection limit, the registry's policies and pools) each get the
//! new values from the reload, so every request and check that starts
//! afterwards sees them, and none in flight is dropped or changed.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::{ArcSwap, Guard};
use tokio_util::sync::CancellationToken;

use crate::access_log::AccessSwitch;
use crate::auth::AdminToken;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::registry::store::{self, StoreError};
use crate::registry::{HealthChecker, Registry};
use crate::reload::{self, ReloadReport, Reloads};
use crate::server::ConnectionLimit;

pub struct Gateway {
    config: ArcSwap<Config>,
    registry: Arc<Registry>,
    proxy: Proxy,
    metrics: Metrics,
    access: AccessSwitch,
    admin_token: AdminToken,
    background: CancellationToken,
    /// One slot per client connection allowed (`limits.max_connections`).
    connection_slots: ConnectionLimit,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    reloads: Mutex<Reloads>,
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
        let gateway = Arc::new(Self {
            proxy: Proxy::new(&config, seed),
            admin_token: AdminToken::new(&config.gateway.admin_token),
            connection_slots: ConnectionLimit::new(config.limits.max_connections as usize),
            config: ArcSwap::new(config),
            registry,
            metrics: Metrics::new(),
            access,
            background,
            reloading: tokio::sync::Mutex::new(()),
            reloads: Mutex::default(),
        });
        if let Err(e) = gateway.registry.start().await {
            gateway.stop_background();
            return Err(e);
        }
        Ok(gateway)
    }

    /// The configuration in force. Hold it briefly: for anything that
    /// outlives a few statements, copy out what you need.
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
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

    /// The check in front of registry writes; its clones follow reloads.
    pub fn admin_token(&self) -> &AdminToken {
        &self.admin_token
    }

    /// The client-connection slots every worker's accept loop takes from.
    pub fn connection_slots(&self) -> &ConnectionLimit {
        &self.connection_slots
    }

    /// Stops every health checker; the server calls it on shutdown.
    pub fn stop_background(&self) {
        self.background.cancel();
    }

    /// Applies `new` to everything that starts from now on, or nothing of
    /// it: a configuration that does not validate, or whose static services
    /// fall outside its upstream networks, is refused whole and the running
    /// one stays. Settings that only a restart can change
    /// ([`reload::needs_restart`]) keep their running values and are listed
    /// in the report as not applied. `new` is taken as the binary would
    /// have it at start (environment overrides applied, `workers = 0`
    /// resolved, the listen address the one bound). Recorded in
    /// [`Gateway::reloads`].
    pub async fn reload(&self, new: Config) -> ReloadReport {
        let _turn = self.reloading.lock().await;
        let report = match self.apply(new).await {
            Ok((applied, not_applied)) => ReloadReport {
                at: SystemTime::now(),
                result: Ok(()),
                applied,
                not_applied,
            },
            Err(error) => ReloadReport::failed(error),
        };
        self.record(report.clone());
        report
    }

    /// Records a reload whose configuration could not even be read or
    /// parsed: `error` says why, and nothing changed.
    pub fn reload_failed(&self, error: impl std::fmt::Display) -> ReloadReport {
        let report = ReloadReport::failed(error);
        self.record(report.clone());
        report
    }

    /// The reloads so far: how many applied, how many were refused, and
    /// the last one's report.
    pub fn reloads(&self) -> Reloads {
        self.reloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks `new` and applies it; the keys applied and those left for a
    /// restart.
    async fn apply(&self, mut new: Config) -> Result<(Vec<String>, Vec<String>), String> {
        new.validate().map_err(|e| e.to_string())?;
        let running = self.config.load_full();
        let (not_applied, applied) = reload::changed_keys(&running, &new)?
            .into_iter()
            .partition(|key| reload::needs_restart(key));
        reload::keep_restart_settings(&mut new, &running);
        let new = Arc::new(new);
        let reconfiguration = self.registry.prepare(new.clone())?;
        // The registry first: only its writer could still fail, and then
        // nothing has changed yet.
        self.registry
            .reconfigure(reconfiguration)
            .await
            .map_err(|e| e.to_string())?;
        self.proxy.reconfigure(&new);
        self.admin_token.set(&new.gateway.admin_token);
        self.connection_slots
            .resize(new.limits.max_connections as usize);
        #[cfg(target_os = "linux")]
        crate::server::open_files::warn_if_short(new.limits.max_connections);
        self.config.store(new);
        Ok((applied, not_applied))
    }

    fn record(&self, report: ReloadReport) {
        self.reloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(report);
    }
}
