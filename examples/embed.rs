//! Mounting the gateway inside another server.
//!
//! An application that already runs a hyper server can serve switchyard's
//! routes (`/call/...`, `/services...`, `/healthz`) from it: build the
//! gateway, build its tower stack once, and hand it the requests that are
//! its own, with the client's address as a `Peer` extension (the proxy
//! forwards it in `X-Forwarded-For`; `switchyard::stack::for_client`
//! builds a stack that knows it for a whole connection). Everything else
//! stays the application's.
//!
//!     cargo run --example embed
//!     curl localhost:8090/                # the application's own page
//!     curl localhost:8090/services        # the gateway's registry
//!
//! This server speaks HTTP/1.1 through hyper; the gateway's own binary
//! serves it with its own HTTP/1 server instead. The stack is the same.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use switchyard::{Config, Gateway, Peer};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into())
        .parse()?;
    let listener = TcpListener::bind(addr).await?;
    let mut config = Config::default();
    // The gateway must know where it is reached: that address is its own,
    // and never an upstream (SPEC §6).
    config.gateway.listen = listener.local_addr()?;
    config.validate()?;
    let gateway = Gateway::new(config).await?;
    let stack = switchyard::stack::stack(gateway);
    println!("listening on http://{}", listener.local_addr()?);

    loop {
        let (stream, remote) = listener.accept().await?;
        let stack = stack.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let stack = stack.clone();
                async move { Ok::<_, Infallible>(route(stack, request, remote).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The gateway's paths go to its stack; the rest is the application's.
async fn route(
    mut stack: switchyard::Stack,
    request: Request<Incoming>,
    remote: SocketAddr,
) -> Response<switchyard::body::Body> {
    let path = request.uri().path();
    let gateway_path = path.starts_with("/call/")
        || path == "/services"
        || path.starts_with("/services/")
        || path == "/healthz";
    if !gateway_path {
        return Response::new(switchyard::body::full("the application's own page\n"));
    }
    let mut request = request.map(|body| body.map_err(Into::into).boxed_unsync());
    request.extensions_mut().insert(Peer::new(remote));
    // The stack never fails: every error is an HTTP answer of its own.
    match stack.ready().await {
        Ok(stack) => match stack.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        Err(never) => match never {},
    }
}
