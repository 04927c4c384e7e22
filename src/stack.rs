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
//!    ([`RequestIdLayer`]): one id follows a call through the gateway, its
//!    log lines and the instance. (tower-http's `SetRequestId` does the
//!    same and also stores the id as a request extension: three
//!    allocations on every request, for a copy nothing here reads.)
//! 3. the access log writes one line per `/call` request while it is on
//!    ([`AccessLogLayer`]), after the request id, which it logs;
//! 4. the request body must make progress every `body_idle_timeout`, as
//!    configured when the request arrives ([`BodyIdleTimeoutLayer`]; a
//!    stall is the client's fault, 408);
//! 5. the [`Router`]: the proxy, or the registry API behind the admin
//!    token.
//!
//! Each instance has its own stack below the proxy
//! ([`crate::registry::InstanceStack`]). Cloning a `Stack` costs reference
//! counts only: servers clone it per connection or per request.
//!
//! The client's address (the proxy forwards it in `X-Forwarded-For`) is
//! the [`Peer`] of the connection's own stack ([`for_client`]: servers
//! build one per connection, from the gateway's), or a `Peer` request
//! extension that a server mounting the gateway may insert instead. The
//! gateway's own servers use the first: an extension costs three
//! allocations per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response, header};
use http_body::Body as _;
use tower::{Layer, Service};
use tower_http::sensitive_headers::{SetSensitiveRequestHeaders, SetSensitiveRequestHeadersLayer};

use crate::access_log::{AccessLog, AccessLogLayer};
use crate::body::{self, Body, IdleTimeout};
use crate::gateway::Gateway;
pub use crate::proxy::headers::Peer;
use crate::proxy::headers::X_REQUEST_ID;
pub use crate::router::Router;

/// The gateway's request handling, every layer included.
pub type Stack = SetSensitiveRequestHeaders<RequestId<AccessLog<BodyIdleTimeout<Router>>>>;

/// Builds the stack over `gateway`.
pub fn stack(gateway: Arc<Gateway>) -> Stack {
    let access = gateway.access_switch().clone();
    tower::ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .layer(RequestIdLayer)
        .layer(AccessLogLayer::new(access))
        .layer(BodyIdleTimeoutLayer::new(gateway.clone()))
        .service(Router::new(gateway))
}

/// The stack of one client connection: `stack`, with `peer` as the client
/// of every request it serves.
pub fn for_client(stack: &Stack, peer: Peer) -> Stack {
    let mut stack = stack.clone();
    stack.get_mut().get_mut().get_mut().get_mut().set_peer(peer);
    stack
}

/// The client of `request`: its `Peer` extension, else `connection`'s,
/// else unknown.
pub fn client_of<B>(request: &Request<B>, connection: Option<&Peer>) -> Peer {
    request
        .extensions()
        .get::<Peer>()
        .or(connection)
        .cloned()
        .unwrap_or_else(Peer::unknown)
}

/// A new request id: a random version 4 UUID from a generator of this
/// thread's, seeded once from the system's (an id needs to be unique,
/// not secret).
fn new_request_id() -> HeaderValue {
    use rand::SeedableRng;
    thread_local! {
        static IDS: std::cell::RefCell<rand::rngs::SmallRng> =
            std::cell::RefCell::new(rand::rngs::SmallRng::from_rng(&mut rand::rng()));
    }
    let id = IDS.with_borrow_mut(crate::proxy::headers::request_id);
    // Owned by one allocation that the request's copy and the response's
    // share (a copied `Bytes` would allocate again when first cloned).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id))
        .unwrap_or(HeaderValue::from_static("-"))
}

/// Gives every request an `X-Request-Id` (a random version 4 UUID when
/// the client sent none) and copies it onto the response when the
/// response has none.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId { inner }
    }
}

/// See [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
}

impl<S> RequestId<S> {
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = match request.headers().get(&X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                request
                    .headers_mut()
                    .insert(X_REQUEST_ID.clone(), id.clone());
                id
            }
        };
        RequestIdFuture {
            inner: self.inner.call(request),
            id: Some(id),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response that gets its request's id.
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, RB, E> Future for RequestIdFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take()
            && let header::Entry::Vacant(vacant) = response.headers_mut().entry(&X_REQUEST_ID)
        {
            vacant.insert(id);
        }
        Poll::Ready(Ok(response))
    }
}

/// Puts the gateway's `body_idle_timeout`, as configured when the request
/// arrives, on every request body.
#[derive(Clone)]
pub struct BodyIdleTimeoutLayer {
    gateway: Arc<Gateway>,
}

impl BodyIdleTimeoutLayer {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

impl<S> Layer<S> for BodyIdleTimeoutLayer {
    type Service = BodyIdleTimeout<S>;

    fn layer(&self, inner: S) -> BodyIdleTimeout<S> {
        BodyIdleTimeout {
            inner,
            gateway: self.gateway.clone(),
        }
    }
}

/// A request body that makes no progress for `body_idle_timeout` while it
/// is awaited fails with [`crate::body::BodyStalled`].
#[derive(Clone)]
pub struct BodyIdleTimeout<S> {
    inner: S,
    gateway: Arc<Gateway>,
}

impl<S> BodyIdleTimeout<S> {
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
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
        let idle = self.gateway.config().limits.body_idle_timeout;
        self.inner
            .call(request.map(|b| body::boxed(IdleTimeout::new(b, idle))))
    }
}
