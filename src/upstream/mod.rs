//! Talking to instances: one pool of keep-alive HTTP/1.1 connections per
//! instance, shared by proxied calls and health checks.
//!
//! A pool per instance (rather than one client keyed by authority) means no
//! hashing and no shared lock on the hot path, and a connection goes back to
//! its pool the moment its response body ends, from the task that read it:
//! no task is spawned per request to wait for the connection to idle.
//!
//! - [`connect`]: resolving the instance's host and opening the TCP
//!   connection, with the connect timeout and `TCP_NODELAY`, to addresses
//!   the [`policy`] allows.
//! - [`h1`]: one HTTP/1.1 connection, driven by the request's own task,
//!   and the response body that reads from it.
//! - [`pool`]: idle connections and their reuse.

pub mod connect;
pub mod h1;
pub mod policy;
pub mod pool;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use crate::body::Body;
pub use h1::UpstreamBody;
pub use pool::{Pool, PoolSettings};

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `index`: its requests use the
/// instances' pools of that index, whose connections live on this thread.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// The worker index of the current thread (0 unless set).
pub fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// Why an upstream call failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    Connect(std::io::Error),
    /// The instance's address is outside the upstream policy: nothing was sent.
    Forbidden(connect::ConnectError),
    /// The request went out (or may have) and no proper response came back.
    Broken(crate::body::BoxError),
}

impl UpstreamError {
    /// Whether nothing at all reached the instance.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Forbidden(_))
    }

    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::Forbidden(_))
    }
}

impl From<connect::ConnectError> for UpstreamError {
    fn from(e: connect::ConnectError) -> Self {
        match e {
            connect::ConnectError::Io(e) => Self::Connect(e),
            forbidden => Self::Forbidden(forbidden),
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "connect failed: {e}"),
            Self::Forbidden(e) => write!(f, "connect refused by the upstream policy: {e}"),
            Self::Broken(e) => write!(f, "upstream response failed: {e}"),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(e) => Some(e),
            Self::Forbidden(e) => Some(e),
            Self::Broken(e) => Some(&**e),
        }
    }
}

/// An instance's pool as a tower service: the innermost layer of the
/// instance's stack. Cloning it is one reference count.
#[derive(Clone)]
pub struct PoolService {
    pool: Arc<Pool>,
}

impl PoolService {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool }
    }
}

impl tower::Service<Request<Body>> for PoolService {
    type Response = Response<UpstreamBody>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        // Connections are opened on demand: always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let pool = self.pool.clone();
        Box::pin(async move { pool.send(request).await })
    }
}
