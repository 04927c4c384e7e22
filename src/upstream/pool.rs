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
//! (`is_closed`), or when hyper hands the request back unsent; the request
//! then goes out on the next connection, so keep-alive races never cost a
//! request that was not sent.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::policy::UpstreamPolicy;
use super::{UpstreamError, connect};
use crate::body::Body;
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
    sender: SendRequest<Body>,
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

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection or
    /// a new one.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        while let Some(mut sender) = self.checkout() {
            // Idle connections had their last response read to the end; one
            // not flagged ready yet only waits for its task to notice.
            if !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.wrap(response, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection was closing. Next one.
                    Some(unsent) => request = unsent,
                    None => return Err(UpstreamError::Broken(e.into_error())),
                },
            }
        }
        let mut sender = self.open().await?;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(self.wrap(response, sender)),
            Err(e) => Err(UpstreamError::Broken(e.into_error())),
        }
    }

    /// Sends `request` on a connection of its own, closed afterwards: for
    /// health checks, which come every `interval` per instance and would
    /// otherwise hold one idle connection open per instance between checks.
    pub async fn send_once(
        &self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = self.open().await?;
        sender
            .try_send_request(request)
            .await
            .map_err(|e| UpstreamError::Broken(e.into_error()))
    }

    /// Idle connections now (for tests and diagnostics).
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Drops idle connections that are closed or past the idle timeout.
    pub fn prune(&self) {
        let now = Instant::now();
        let timeout = self.settings.idle_timeout;
        self.lock()
            .retain(|idle| !idle.sender.is_closed() && now - idle.since < timeout);
    }

    fn checkout(&self) -> Option<SendRequest<Body>> {
        let now = Instant::now();
        let mut idle = self.lock();
        while let Some(Idle { sender, since }) = idle.pop() {
            if !sender.is_closed() && now - since < self.settings.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn open(&self) -> Result<SendRequest<Body>, UpstreamError> {
        let settings = &self.settings;
        let stream = connect::connect(
            &self.host,
            self.port,
            settings.connect_timeout,
            &settings.policy,
        )
        .await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(std::io::Error::other(e)))?;
        let (host, port) = (self.host.clone(), self.port);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%host, port, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn wrap(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: SendRequest<Body>,
    ) -> Response<PooledBody> {
        let done = http_body::Body::is_end_stream(response.body());
        let slot = if done {
            self.checkin(sender);
            None
        } else {
            Some((self.clone(), sender))
        };
        response.map(|inner| PooledBody { inner, slot })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pin_project! {
    /// A response body that gives its connection back to the pool when it
    /// has been read to the end.
    pub struct PooledBody {
        #[pin]
        inner: Incoming,
        slot: Option<(Arc<Pool>, SendRequest<Body>)>,
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // A reader that knows the length stops at the last byte and never
        // polls for the end: the connection goes back with the last frame.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some((pool, sender)) = this.slot.take() {
                pool.checkin(sender);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
