//! Which handler serves a request: `/call/<service>/*` → the proxy,
//! `/services*` → the registry API (writes behind the admin token),
//! `/healthz` → liveness, `/status` and `/status.json` → the status page,
//! else 404. `CONNECT` is refused everywhere.
//!
//! The router is the innermost service of the gateway's stack
//! ([`crate::stack`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tower::Service;
use tower_http::validate_request::{ValidateRequestHeader, ValidateRequestHeaderLayer};

use crate::api;
use crate::auth::AdminToken;
use crate::body::Body;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::metrics;
use crate::proxy::{self, headers::Peer};
use crate::status;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// Routes a request to the proxy or the registry API.
#[derive(Clone)]
pub struct Router {
    gateway: Arc<Gateway>,
    api: ValidateRequestHeader<Api, AdminToken>,
    /// The client of the connection this router serves, if it is one
    /// connection's ([`crate::stack::for_client`]).
    peer: Option<Peer>,
}

impl Router {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        let api = tower::ServiceBuilder::new()
            .layer(ValidateRequestHeaderLayer::custom(
                gateway.admin_token().clone(),
            ))
            .service(Api {
                gateway: gateway.clone(),
            });
        Self {
            gateway,
            api,
            peer: None,
        }
    }

    /// Serves the connection of the client `peer`.
    pub fn set_peer(&mut self, peer: Peer) {
        self.peer = Some(peer);
    }
}

impl Service<Request<Body>> for Router {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> BoxFuture {
        if request.method() == Method::CONNECT {
            // Not a forward proxy: no tunnels to anywhere.
            let refused = GatewayError::method_not_allowed(
                "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE",
            );
            return Box::pin(std::future::ready(Ok(refused.into_response())));
        }
        let path = request.uri().path();
        if path.starts_with(proxy::path::PREFIX) {
            let peer = crate::stack::client_of(&request, self.peer.as_ref());
            let forward = proxy::Proxy::forward(self.gateway.clone(), request, peer);
            return Box::pin(Answer { inner: forward });
        }
        if path == "/services" || path.starts_with("/services/") {
            let mut api = self.api.clone();
            return Box::pin(async move {
                match api.call(request).await {
                    Ok(response) => Ok(response),
                    Err(never) => match never {},
                }
            });
        }
        let method = request.method();
        let answer = match path {
            "/healthz" => api::healthz(method, self.gateway.registry()),
            status::PAGE_PATH => status::page(method),
            status::SNAPSHOT_PATH => status::snapshot(method, &self.gateway),
            metrics::PATH => metrics::serve(method, &self.gateway),
            _ => Err(api::not_found(path)),
        };
        Box::pin(std::future::ready(Ok(
            answer.unwrap_or_else(GatewayError::into_response)
        )))
    }
}

/// The registry API as a service, for the admin-token layer to wrap.
#[derive(Clone)]
pub struct Api {
    gateway: Arc<Gateway>,
}

impl Service<Request<Body>> for Api {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> BoxFuture {
        let gateway = self.gateway.clone();
        Box::pin(async move {
            Ok(api::handle(gateway.registry(), request)
                .await
                .unwrap_or_else(GatewayError::into_response))
        })
    }
}

pin_project_lite::pin_project! {
    /// The proxy's answer as the router's (an async block would hold the
    /// proxy's arguments beside its future, in a box twice as large).
    struct Answer<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Response<Body>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map(Ok)
    }
}
