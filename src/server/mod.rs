//! The accept loop: connection limit, HTTP/1 and HTTP/2 with timeouts that
//! really fire, and graceful shutdown (SPEC §1).
//!
//! `run` takes a bound listener, so tests bind `127.0.0.1:0` and read the
//! port back; `main` binds the configured address.
//!
//! Every connection starts on the HTTP/1.1 fast path ([`fast`]), which
//! serves the common proxied request itself; the first request it does not
//! take hands the connection, with the bytes read so far, to hyper's server
//! (HTTP/1 and HTTP/2) for the rest of its life.

mod fast;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::body::{Body, BoxError};
use crate::error::{ErrorCode, GatewayError};
use crate::framing::{FramingLog, Sniffed};
use crate::gateway::Gateway;
use crate::proxy::headers::Peer;
use crate::router;

/// Checks that `addr` is free (no one else listens there, even with
/// SO_REUSEPORT) and resolves port 0 to a real port, for the workers' own
/// sockets to bind.
pub fn claim(addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    std::net::TcpListener::bind(addr)?.local_addr()
}

/// A listening socket on `addr` that other workers can share
/// (SO_REUSEPORT), so each worker accepts its own connections and the
/// kernel spreads them over the workers.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish for up to `shutdown_grace`, stops the health
/// checkers and returns.
pub async fn run(listener: TcpListener, gateway: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    // This thread's writes go out together at the end of each turn.
    crate::turn::batch_writes();
    let config = gateway.config();
    let limits = &config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Without a timer hyper silently skips the header read timeout.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes as usize)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes);

    // Shared by every worker: the limit is the gateway's, not each worker's.
    let connections = gateway.connection_slots().clone();
    let hyper = Arc::new(builder);
    // Cancelled when shutdown begins: connections finish the request in
    // flight and close.
    let draining = CancellationToken::new();
    // The connections' tasks: those still open when the grace period is over
    // are aborted. (A cancellation token per connection would instead be
    // polled, two locks each time, every time the connection's task runs.)
    let mut open = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (stream, remote) = tokio::select! {
            // Finished connections are collected as they finish.
            Some(_) = open.join_next(), if !open.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on accept.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Past `max_connections`, a new connection waits for a slot (and the
        // ones behind it in the kernel's backlog). Accepting first matters
        // with several workers: a connection the kernel queued on one worker
        // must not wait for a slot another worker holds while idle in accept.
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                tracing::debug!(%remote, "max_connections reached: connection waits for a slot");
                tokio::select! {
                    permit = connections.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let client = Client {
            gateway: gateway.clone(),
            peer: Arc::new(Peer::new(remote)),
            hyper: hyper.clone(),
            draining: draining.clone(),
        };
        open.spawn(async move {
            let _permit = permit;
            if let Err(e) = client.serve(stream).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let grace = config.gateway.shutdown_grace;
    tracing::info!(grace = %crate::config::fmt_duration(grace), "shutting down: finishing in-flight requests");
    gateway.stop_background();
    draining.cancel();
    // Bounded by the grace period whatever the connections do: hyper's own
    // graceful shutdown can wait forever on idle h2 connections (hyper#1885).
    let finished = async { while open.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, finished).await.is_err() {
        tracing::warn!("grace period over: closing the connections still open");
        open.shutdown().await;
    }
    tracing::info!("stopped");
}

/// What a client connection needs: the gateway, the client's address, and
/// hyper's server for the requests the fast path does not take.
struct Client {
    gateway: Arc<Gateway>,
    peer: Arc<Peer>,
    hyper: Arc<auto::Builder<TokioExecutor>>,
    draining: CancellationToken,
}

impl Client {
    async fn serve(self, stream: TcpStream) -> Result<(), BoxError> {
        let limits = &self.gateway.config().limits;
        let Some((stream, read)) = fast::serve(&self, stream, limits).await? else {
            return Ok(());
        };
        // From here on hyper serves the connection, starting with the bytes
        // the fast path read and did not take; the framing check watches them.
        let framing = Arc::new(FramingLog::default());
        let io = Sniffed::new(
            stream,
            read.freeze(),
            limits.max_header_bytes as usize,
            framing.clone(),
        );
        let service = Connection {
            gateway: self.gateway,
            peer: self.peer,
            framing,
            served: Arc::new(AtomicU64::new(0)),
        };
        let connection = self.hyper.serve_connection(TokioIo::new(io), service);
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            done = connection.as_mut() => return done,
            () = self.draining.cancelled() => {}
        }
        connection.as_mut().graceful_shutdown();
        connection.await
    }
}

/// One client connection's view of the gateway: hyper calls it per request.
#[derive(Clone)]
struct Connection {
    gateway: Arc<Gateway>,
    peer: Arc<Peer>,
    framing: Arc<FramingLog>,
    /// Requests served so far: the index the framing log speaks of.
    served: Arc<AtomicU64>,
}

impl hyper::service::Service<Request<Incoming>> for Connection {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let index = self.served.fetch_add(1, Ordering::Relaxed);
        if self.framing.conflicted(index) {
            return Box::pin(async { Ok(conflicting_framing()) });
        }
        let gateway = self.gateway.clone();
        let peer = self.peer.clone();
        Box::pin(async move { Ok(router::route(&gateway, request, &peer).await) })
    }
}

/// The answer to a request with both `Content-Length` and
/// `Transfer-Encoding`: 400, never forwarded, and the connection closed, so
/// nothing after its body is read as another request.
fn conflicting_framing() -> Response<Body> {
    let mut response = GatewayError::new(
        ErrorCode::BadRequest,
        "the request has both Content-Length and Transfer-Encoding",
    )
    .into_response();
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}
