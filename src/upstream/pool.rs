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

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::h1::{Connection, SendError, UpstreamBody};
use super::policy::UpstreamPolicy;
use super::{Outbound, UpstreamError, connect};
use crate::config::Config;

/// Idle connections kept per instance, at most.
pub const MAX_IDLE: usize = 1024;

/// What every pool needs from the configuration.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Worker threads: each instance gets one pool per worker.
    pub workers: usize,
    pub policy: UpstreamPolicy,
}

impl PoolSettings {
    /// `listen` is the address the gateway really listens on.
    pub fn new(config: &Config, listen: std::net::SocketAddr) -> Self {
        Self {
            connect_timeout: config.proxy.connect_timeout,
            idle_timeout: config.proxy.pool_idle_timeout,
            workers: config.gateway.workers,
            policy: UpstreamPolicy::new(&config.upstreams, listen),
        }
    }
}

struct Idle {
    conn: Connection,
    since: Instant,
}

pub struct Pool {
    host: String,
    port: u16,
    settings: Arc<PoolSettings>,
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
    pub fn new(host: &str, port: u16, settings: Arc<PoolSettings>) -> Self {
        Self {
            host: host.to_string(),
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
        while let Some(conn) = self.checkout() {
            match conn.send(request, Some(self.clone())).await {
                Ok(response) => return Ok(response),
                // Nothing went out on a connection that had died: next one.
                Err(SendError::Unsent(unsent, _)) => request = *unsent,
                Err(SendError::Failed(e)) => return Err(UpstreamError::Broken(e)),
            }
        }
        let conn = self.open().await?;
        conn.send(request, Some(self.clone())).await.map_err(broken)
    }

    /// Sends `request` on a connection of its own, closed afterwards: for
    /// health checks, which come every `interval` per instance and would
    /// otherwise hold one idle connection open per instance between checks.
    pub async fn send_once(
        &self,
        request: Outbound,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let conn = self.open().await?;
        conn.send(request, None).await.map_err(broken)
    }

    /// Idle connections now (for tests and diagnostics).
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Drops idle connections past the idle timeout or closed by the instance.
    pub fn prune(&self) {
        let now = Instant::now();
        let timeout = self.settings.idle_timeout;
        self.lock()
            .retain_mut(|idle| now - idle.since < timeout && idle.conn.is_reusable());
    }

    /// The most recently used idle connection that is still fit for use.
    fn checkout(&self) -> Option<Connection> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(Idle { mut conn, since }) = idle.pop() {
            if now - since < self.settings.idle_timeout && conn.is_reusable() {
                return Some(conn);
            }
        }
        None
    }

    /// Takes back a connection whose response was read to its end.
    pub(super) fn checkin(&self, conn: Connection) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn open(&self) -> Result<Connection, UpstreamError> {
        let settings = &self.settings;
        let stream = connect::connect(
            &self.host,
            self.port,
            settings.connect_timeout,
            &settings.policy,
        )
        .await?;
        Ok(Connection::new(stream))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn broken(e: SendError) -> UpstreamError {
    match e {
        SendError::Unsent(_, e) => UpstreamError::Broken(e.into()),
        SendError::Failed(e) => UpstreamError::Broken(e),
    }
}
