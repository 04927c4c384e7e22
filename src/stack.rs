//! The gateway as one tower service (SPEC §10): what every way in calls.
//!
//! The HTTP/1 server ([`crate::server`]), hyper's HTTP/2 server, and any
//! other server that mounts the gateway (see `examples/embed.rs`) hand
//! each request to a clone of [`Stack`], built once with `ServiceBuilder`:
//!
//! 1. `Authorization` is marked sensitive, so no log line shows it
//!    (tower-http's `SetSensitiveRequestHeaders`);
//! 2. every request gets an `X-Request-Id` (kept when the client sent one,
//!    else a new random UUID) and every response carries it back
//!    (tower-http's `SetRequestId` and `PropagateRequestId`): one id
//!    follows a call through the gateway, its log lines and the instance;
//! 3. the request body must make progress every `body_idle_timeout`
//!    ([`BodyIdleTimeoutLayer`]; a stall is the client's fault, 408);
//! 4. the [`Router`]: the proxy, or the registry API behind the admin
//!    token.
//!
//! Each instance has its own stack below the proxy
//! ([`crate::registry::InstanceStack`]). Cloning a `Stack` costs reference
//! counts only: servers clone it per connection or per request.
//!
//! Requests carry the client's address as a [`Peer`] extension (the proxy
//! forwards it in `X-Forwarded-For`); a server that mounts the gateway
//! inserts it.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, header};
use http_body::Body as _;
use tower::{Layer, Service};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestId, PropagateRequestIdLayer, RequestId, SetRequestId,
    SetRequestIdLayer,
};
use tower_http::sensitive_headers::{SetSensitiveRequestHeaders, SetSensitiveRequestHeadersLayer};

use crate::body::{self, Body, IdleTimeout};
use crate::gateway::Gateway;
pub use crate::proxy::headers::Peer;
pub use crate::router::Router;

/// The gateway's request handling, every layer included.
pub type Stack = SetSensitiveRequestHeaders<
    SetRequestId<PropagateRequestId<BodyIdleTimeout<Router>>, NewRequestId>,
>;

/// Builds the stack over `gateway`.
pub fn stack(gateway: Arc<Gateway>) -> Stack {
    let idle = gateway.config().limits.body_idle_timeout;
    tower::ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .layer(SetRequestIdLayer::x_request_id(NewRequestId))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(BodyIdleTimeoutLayer { idle })
        .service(Router::new(gateway))
}

/// Makes the id of a request that came without one: a random version 4
/// UUID.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let id = crate::proxy::headers::request_id(&mut rand::rng());
        HeaderValue::from_bytes(&id).ok().map(RequestId::new)
    }
}

/// Puts `body_idle_timeout` on every request body.
#[derive(Debug, Clone, Copy)]
pub struct BodyIdleTimeoutLayer {
    idle: Duration,
}

impl BodyIdleTimeoutLayer {
    pub fn new(idle: Duration) -> Self {
        Self { idle }
    }
}

impl<S> Layer<S> for BodyIdleTimeoutLayer {
    type Service = BodyIdleTimeout<S>;

    fn layer(&self, inner: S) -> BodyIdleTimeout<S> {
        BodyIdleTimeout {
            inner,
            idle: self.idle,
        }
    }
}

/// A request body that makes no progress for `idle` while it is awaited
/// fails with [`crate::body::BodyStalled`].
#[derive(Debug, Clone)]
pub struct BodyIdleTimeout<S> {
    inner: S,
    idle: Duration,
}

impl<S> Service<Request<Body>> for BodyIdleTimeout<S>
where
    S: Service<Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> S::Future {
        // Most requests have no body: nothing to watch.
        if request.body().is_end_stream() {
            return self.inner.call(request);
        }
        let idle = self.idle;
        self.inner
            .call(request.map(|b| body::boxed(IdleTimeout::new(b, idle))))
    }
}
