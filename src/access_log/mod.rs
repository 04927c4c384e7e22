//! The access log (SPEC §9): one line per proxied request (`/call/...`),
//! written through `tracing` at `info` with the target
//! [`TARGET`] (`switchyard::access`), so `RUST_LOG` keeps or drops it like
//! any other line (`RUST_LOG=warn,switchyard::access=info`) and
//! `[log] format` shapes it like every line: text `key=value`, or one JSON
//! object with one key per field.
//!
//! The fields:
//!
//! - `request_id`: the request's `X-Request-Id`, the client's or the one
//!   the gateway made (the layer sits after [`crate::stack::RequestIdLayer`]);
//! - `method`;
//! - `service`: as the path names it, `/call/<service>/...`;
//! - `path`: what follows `/call/<service>`, byte for byte as it is
//!   forwarded below the instance's base path (`""` when nothing follows).
//!   The query is left out: it often carries credentials, and the access
//!   log is read by more people than the instances' own logs;
//! - `instance`: the instance the last attempt went to, `-` when none went
//!   out (an unknown service, no routable instance, a refused path);
//! - `status`: the status the client was answered with; 499, nginx's
//!   "client closed request", when the client went away before the answer
//!   was ready;
//! - `attempts`: the attempts that went out to instances (a circuit that
//!   refused at the last moment costs none);
//! - `duration_ms`: from the request reaching the stack (its head read) to
//!   the end of the response body;
//! - `bytes_in`: the bytes of the request body the gateway read;
//! - `bytes_out`: the bytes of the response body handed to the server.
//!
//! The line is written when the response body has ended, or when it is
//! dropped before that: a client that goes away in the middle of a body
//! still gets its line, with the bytes that went out until then.
//!
//! Whether to log is decided per request from an [`AccessSwitch`], which
//! [`crate::log::Logging`] turns on and off while the gateway runs. Off, a
//! request costs the layer one relaxed atomic load: no allocation, no
//! wrapped body. On, the line's fields are copied (reference counts, for
//! the most part) into the response body's new box, and a request with a
//! body gets a box and a shared counter around it. The instance and the
//! attempt count come from the proxy, as the response extension
//! [`crate::proxy::Served`].

mod body;
mod future;
mod layer;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use tokio::time::Instant;
use tower::Service;

use crate::body::Body;
use crate::proxy::Served;
use crate::proxy::headers::X_REQUEST_ID;
use crate::proxy::path::PREFIX;
use body::{CountedBody, LoggedBody};
pub use future::ResponseFuture;
pub use layer::AccessLogLayer;

/// The `tracing` target of every access line.
pub const TARGET: &str = "switchyard::access";

/// Whether the access log is on: one flag shared by the stack's layer,
/// the proxy (which only then marks its responses with [`Served`]) and
/// whoever turns it on and off.
#[derive(Debug, Clone, Default)]
pub struct AccessSwitch(Arc<AtomicBool>);

impl AccessSwitch {
    pub fn new(on: bool) -> Self {
        Self(Arc::new(AtomicBool::new(on)))
    }

    /// Relaxed: nothing else is read on the strength of it, and a request
    /// in flight when it changes may go either way.
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

/// Writes one access line per `/call/...` request while its switch is on;
/// see the [module docs](self).
#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    switch: AccessSwitch,
}

impl<S> AccessLog<S> {
    pub fn new(inner: S, switch: AccessSwitch) -> Self {
        Self { inner, switch }
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S> Service<Request<Body>> for AccessLog<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        if !self.switch.is_on()
            || !request.uri().path().starts_with(PREFIX)
            || !tracing::enabled!(target: TARGET, tracing::Level::INFO)
        {
            return ResponseFuture::new(self.inner.call(request), None);
        }
        let started = Instant::now();
        let (request, read) = if request.body().is_end_stream() {
            (request, None)
        } else {
            let read = Arc::new(AtomicU64::new(0));
            let counted = read.clone();
            let request = request.map(|body| crate::body::boxed(CountedBody::new(body, counted)));
            (request, Some(read))
        };
        let entry = Entry {
            started,
            request_id: request
                .headers()
                .get(&X_REQUEST_ID)
                .cloned()
                .unwrap_or(HeaderValue::from_static("-")),
            method: request.method().clone(),
            uri: request.uri().clone(),
            bytes_in: read,
            status: None,
            served: Served::default(),
            bytes_out: 0,
        };
        ResponseFuture::new(self.inner.call(request), Some(entry))
    }
}

/// One request's access line, gathered as the request goes, and written
/// when it is dropped: by the response body at its end, or by whatever
/// drops it before (the response future, a body the client left).
struct Entry {
    started: Instant,
    request_id: HeaderValue,
    method: Method,
    uri: Uri,
    /// The request body's counter; `None` when it had no body.
    bytes_in: Option<Arc<AtomicU64>>,
    /// `None` until the response is ready.
    status: Option<StatusCode>,
    served: Served,
    bytes_out: u64,
}

/// What nginx logs for a client that closed the connection before the
/// answer: no response went out, and none of the usual codes says so.
const CLIENT_CLOSED: u16 = 499;

impl Drop for Entry {
    fn drop(&mut self) {
        let after = self.uri.path().strip_prefix(PREFIX).unwrap_or_default();
        let (service, path) = after.split_at(after.find('/').unwrap_or(after.len()));
        // Header values are visible ASCII in practice; anything else is
        // logged with replacement characters, never dropped.
        let request_id = String::from_utf8_lossy(self.request_id.as_bytes());
        let elapsed = self.started.elapsed();
        tracing::info!(
            target: TARGET,
            request_id = &*request_id,
            method = self.method.as_str(),
            service,
            path,
            instance = self.served.instance.as_deref().unwrap_or("-"),
            status = self.status.map_or(CLIENT_CLOSED, |s| s.as_u16()),
            attempts = self.served.attempts,
            // Whole microseconds, so the figure prints as a short decimal.
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
            bytes_in = self
                .bytes_in
                .as_ref()
                .map_or(0, |read| read.load(Ordering::Relaxed)),
            bytes_out = self.bytes_out,
        );
    }
}

#[cfg(test)]
mod tests;
