//! Talking to instances: one pool of keep-alive HTTP/1.1 connections per
//! instance for proxied calls. Health checks open their connections through
//! it (one connect path, one upstream policy) and keep them on their own
//! (`registry::checker`).
//!
//! A pool per instance (rather than one client keyed by authority) means no
//! hashing and no shared lock on the hot path, and a connection goes back to
//! its pool the moment its response body ends, from the task that read it:
//! no task is spawned per request to wait for the connection to idle.
//!
//! - [`connect`]: resolving the instance's host and opening the TCP
//!   connection, with the connect timeout and `TCP_NODELAY`, to addresses
//!   the [`policy`] allows.
//! - [`conn`]: one HTTP/1.1 connection, driven by the request's own task,
//!   and the response body that reads from it.
//! - [`pool`]: idle connections and their reuse.
//! - [`recycle`]: the buffers large response bodies are read into.
//! - [`timeout`]: one attempt's time limit, a tower layer.
//! - [`PoolService`]: the pools of one instance as the innermost tower
//!   service of its stack.

pub mod conn;
pub mod connect;
pub mod policy;
pub mod pool;
mod recycle;
pub mod timeout;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Response};

use crate::body::Body;
pub use conn::UpstreamBody;
pub use pool::{Pool, PoolSettings, SharedPoolSettings};
pub use timeout::{AttemptTimeout, AttemptTimeoutLayer, Deadline, Deadlined, TimedOut};

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
    /// The client's request body failed while it was being sent (it
    /// stalled or broke off): the client's fault, not the instance's.
    ClientBody(crate::body::BoxError),
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
            Self::ClientBody(e) => write!(f, "the client's request body failed: {e}"),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect(e) => Some(e),
            Self::Forbidden(e) => Some(e),
            Self::Broken(e) | Self::ClientBody(e) => Some(&**e),
        }
    }
}

/// A request as one instance receives it: its head, encoded but for the
/// framing header the connection adds from the body it sends, and its body.
pub struct Outbound {
    pub method: Method,
    /// The request line, `Host` and the other header fields, each line
    /// ending in CRLF.
    pub head: Vec<u8>,
    /// Whether an empty body is still declared (`Content-Length: 0`): the
    /// client declared it, or the method usually carries a body.
    pub declare_empty: bool,
    pub body: Body,
    /// When the attempt gives up waiting for response headers.
    pub deadline: Deadline,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("method", &self.method)
            .field("head", &String::from_utf8_lossy(&self.head))
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// `target` is the origin-form target in pieces, written one after the
    /// other; `fields` are header lines sent as they are.
    pub fn new(
        method: Method,
        target: &[&str],
        host: &HeaderValue,
        fields: &[u8],
        body: Body,
    ) -> Self {
        Self::with_deadline(method, target, host, fields, body, Deadline::None)
    }

    /// As [`Outbound::new`], for an attempt bounded by `deadline`.
    pub fn with_deadline(
        method: Method,
        target: &[&str],
        host: &HeaderValue,
        fields: &[u8],
        body: Body,
        deadline: Deadline,
    ) -> Self {
        let target_len: usize = target.iter().map(|piece| piece.len()).sum();
        let mut head =
            Vec::with_capacity(method.as_str().len() + target_len + host.len() + fields.len() + 64);
        head.extend_from_slice(method.as_str().as_bytes());
        head.push(b' ');
        for piece in target {
            head.extend_from_slice(piece.as_bytes());
        }
        head.extend_from_slice(b" HTTP/1.1\r\n");
        crate::http1::encode::field(&mut head, "host", host.as_bytes());
        head.extend_from_slice(fields);
        let declare_empty = matches!(method, Method::POST | Method::PUT | Method::PATCH);
        Self {
            method,
            head,
            declare_empty,
            body,
            deadline,
        }
    }
}

impl Deadlined for Outbound {
    fn deadline(&self) -> &Deadline {
        &self.deadline
    }
}

/// An instance's connection pools as a tower service: the innermost layer
/// of the instance's stack. It holds one pool per worker and sends on the
/// calling worker's, so a connection is only ever driven by the thread it
/// lives on. Cloning it is one reference count.
#[derive(Debug, Clone)]
pub struct PoolService {
    pools: Arc<[Arc<Pool>]>,
}

impl PoolService {
    pub fn new(pools: Arc<[Arc<Pool>]>) -> Self {
        Self { pools }
    }

    /// The calling worker's pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pools[worker() % self.pools.len()]
    }
}

impl tower::Service<Outbound> for PoolService {
    type Response = Response<UpstreamBody>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        // Connections are opened on demand: always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Outbound) -> Self::Future {
        let pool = self.pool().clone();
        Box::pin(async move { pool.send(request).await })
    }
}
