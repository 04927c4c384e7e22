//! One instance's idle keep-alive connections.
//!
//! A request takes the most recently used idle connection (its socket is the
//! warmest, and the oldest ones age out at the bottom), or opens a new one.
//! The connection comes back when the response body has been read to its
//! end, from the task that read it. A response dropped early (the client
//! went away, a retry gave up on it) takes its connection down with it:
//! HTTP/1 cannot abandon a message half-read and reuse the connection.
//!
//! A pooled connection the instance closed meanwhile is noticed before use
//! (its socket turned readable while idle), or when not a byte of the
//! request could be written; the request then goes out on the next
//! connection, so keep-alive expiry does not cost a request never sent.
//!
//! The settings are the gateway's current ones, read at each use: a reload
//! swaps them for every pool at once ([`SharedPoolSettings`]). A connection
//! opened under upstream networks a reload has since changed is not reused:
//! its address was checked against rules no longer in force.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Response;
use tokio::time::Instant;

use super::conn::{SendError, UpstreamBody, UpstreamConnection};
use super::policy::UpstreamPolicy;
use super::{Outbound, UpstreamError, connect};
use crate::config::Config;

/// Idle connections kept per instance, at most.
pub const MAX_IDLE: usize = 1024;

/// What every pool needs from the configuration.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this.
    pub pool_idle_timeout: Duration,
    /// A request body the instance takes no byte of for this long fails.
    pub idle_timeout: Duration,
    /// Worker threads: each instance gets one pool per worker.
    pub workers: usize,
    pub policy: UpstreamPolicy,
}

/// The settings every pool reads, swapped whole by a reload.
pub type SharedPoolSettings = Arc<ArcSwap<PoolSettings>>;

impl PoolSettings {
    /// `listen` is the address the gateway really listens on.
    pub fn new(config: &Config, listen: std::net::SocketAddr) -> Self {
        Self {
            connect_timeout: config.proxy.connect_timeout,
            pool_idle_timeout: config.proxy.pool_idle_timeout,
            idle_timeout: config.proxy.idle_timeout,
            workers: config.gateway.workers,
            policy: UpstreamPolicy::new(&config.upstreams, listen),
        }
    }

    /// These settings as a reloaded `config` has them: its timeouts and
    /// upstream networks. The worker count and the gateway's own address
    /// stay: they change only with a restart.
    pub fn reconfigured(&self, config: &Config) -> Self {
        Self {
            connect_timeout: config.proxy.connect_timeout,
            pool_idle_timeout: config.proxy.pool_idle_timeout,
            idle_timeout: config.proxy.idle_timeout,
            workers: self.workers,
            policy: self.policy.with_networks(&config.upstreams),
        }
    }
}

struct Idle {
    conn: UpstreamConnection,
    since: Instant,
}

pub struct Pool {
    host: Arc<str>,
    port: u16,
    settings: SharedPoolSettings,
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl Pool {
    pub fn new(host: Arc<str>, port: u16, settings: SharedPoolSettings) -> Self {
        Self {
            host,
            port,
            settings,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `request` on an idle connection or a new one.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Outbound,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let idle = self.settings.load().idle_timeout;
        while let Some(conn) = self.checkout() {
            match conn.send(request, Some(self.clone()), idle).await {
                Ok(response) => return Ok(response),
                // Nothing went out on a connection that had died: next one.
                Err(SendError::Unsent(unsent, _)) => request = *unsent,
                Err(e) => return Err(e.into()),
            }
        }
        let conn = self.open().await?;
        Ok(conn.send(request, Some(self.clone()), idle).await?)
    }

    /// The settings it reads, the gateway's current ones.
    pub fn settings(&self) -> Arc<PoolSettings> {
        self.settings.load_full()
    }

    /// Idle connections now (for tests and diagnostics).
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Drops idle connections past the idle timeout, closed by the
    /// instance, or checked under upstream networks no longer in force;
    /// the others let go of their read buffer.
    pub fn prune(&self) {
        let now = Instant::now();
        let settings = self.settings.load();
        // Those that stay let go of their read buffer: a connection kept
        // busy keeps its own (and what it learned of its reads), one that
        // waits between health checks costs its socket only.
        self.lock().retain_mut(|idle| {
            let keep = fit(&mut idle.conn, idle.since, now, &settings);
            if keep {
                idle.conn.shed_read_buffer();
            }
            keep
        });
    }

    /// The most recently used idle connection that is still fit for use.
    fn checkout(&self) -> Option<UpstreamConnection> {
        let now = Instant::now();
        let settings = self.settings.load();
        let mut idle = self.lock();
        while let Some(mut candidate) = idle.pop() {
            if fit(&mut candidate.conn, candidate.since, now, &settings) {
                return Some(candidate.conn);
            }
        }
        None
    }

    /// Takes back a connection whose response was read to its end.
    pub(super) fn checkin(&self, conn: UpstreamConnection) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// A new connection to the instance, under the current settings.
    pub async fn open(&self) -> Result<UpstreamConnection, UpstreamError> {
        let settings = self.settings.load_full();
        let stream = connect::connect(
            &self.host,
            self.port,
            settings.connect_timeout,
            &settings.policy,
        )
        .await?;
        Ok(UpstreamConnection::new(
            stream,
            settings.policy.generation(),
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether a connection idle since `since` may take a request under
/// `settings` at `now`: not idle past the timeout, its address checked
/// under the upstream networks in force, and not closed by the instance
/// meanwhile. The rule for every kept connection, pooled or kept for
/// health checks.
pub fn fit(
    conn: &mut UpstreamConnection,
    since: Instant,
    now: Instant,
    settings: &PoolSettings,
) -> bool {
    now - since < settings.pool_idle_timeout
        && conn.policy_generation == settings.policy.generation()
        && conn.is_reusable()
}

impl From<SendError> for UpstreamError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Unsent(_, e) => Self::Broken(e.into()),
            SendError::ClientBody(e) => Self::ClientBody(e),
            SendError::Failed(e) => Self::Broken(e),
        }
    }
}
