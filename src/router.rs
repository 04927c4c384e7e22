//! Which handler serves a request: `/services*` → the registry API (writes
//! behind the admin token), `/call/<service>/*` → the proxy, `/healthz` →
//! liveness, else 404. `CONNECT` is refused everywhere.

use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::proxy::{self, headers::Peer};
use crate::{api, auth};

pub async fn route(gateway: &Gateway, request: Request<Incoming>, peer: &Peer) -> Response<Body> {
    if request.method() == Method::CONNECT {
        // Not a forward proxy: no tunnels to anywhere.
        return GatewayError::method_not_allowed(
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE",
        )
        .into_response();
    }
    let path = request.uri().path();
    let result = if path.starts_with(proxy::path::PREFIX) {
        return gateway
            .proxy()
            .forward(gateway.registry(), request, peer)
            .await;
    } else if path == "/services" || path.starts_with("/services/") {
        if auth::is_write(request.method()) {
            if let Err(e) =
                auth::authorize(&gateway.config().gateway.admin_token, request.headers())
            {
                return e.into_response();
            }
        }
        api::handle(gateway.registry(), request).await
    } else if path == "/healthz" {
        api::healthz(request.method())
    } else {
        Err(api::not_found(path))
    };
    result.unwrap_or_else(|e| e.into_response())
}
