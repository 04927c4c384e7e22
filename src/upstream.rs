//! The one pooled HTTP client every upstream call goes through: proxied
//! requests and health checks alike.

use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::ProxyConfig;

pub type UpstreamClient = Client<HttpConnector, Body>;

/// Builds the shared client: keep-alive pool with an idle timeout, a connect
/// timeout and `TCP_NODELAY` (hyper's connector sets neither by default, and
/// without a timer the pool's idle timeout is silently ignored).
pub fn client(config: &ProxyConfig) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .build(connector)
}

/// The shared client as a tower service: the innermost layer of every
/// instance's stack. Cloning it is one reference count.
#[derive(Clone)]
pub struct Upstream {
    client: std::sync::Arc<UpstreamClient>,
}

impl Upstream {
    pub fn new(client: UpstreamClient) -> Self {
        Self {
            client: std::sync::Arc::new(client),
        }
    }
}

impl tower::Service<http::Request<Body>> for Upstream {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // The pool opens connections on demand: always ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.client.request(request)
    }
}
