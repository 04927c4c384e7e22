//! Which handler serves a request: `/services*` → the registry API,
//! `/call/<service>/*` → the proxy, `/healthz` → liveness, else 404.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::api;
use crate::body::Body;
use crate::gateway::Gateway;
use crate::proxy::{self, headers::Peer};

pub async fn route(gateway: &Gateway, request: Request<Incoming>, peer: &Peer) -> Response<Body> {
    let path = request.uri().path();
    let result = if path.starts_with(proxy::path::PREFIX) {
        return gateway
            .proxy()
            .forward(gateway.registry(), request, peer)
            .await;
    } else if path == "/services" || path.starts_with("/services/") {
        api::handle(gateway.registry(), request).await
    } else if path == "/healthz" {
        api::healthz(request.method())
    } else {
        Err(api::not_found(path))
    };
    result.unwrap_or_else(|e| e.into_response())
}
