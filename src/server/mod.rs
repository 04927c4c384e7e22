//! The accept loop: connection limit, the connections' protocols, and
//! graceful shutdown (SPEC §1).
//!
//! `run` takes a bound listener, so tests bind `127.0.0.1:0` and read the
//! port back; `main` binds the configured address.
//!
//! Every connection starts with the gateway's own HTTP/1 server ([`h1`]),
//! which serves every HTTP/1.0 and 1.1 request with the one codec
//! ([`crate::http1`]). A connection that opens with the HTTP/2 preface is
//! handed, before anything is parsed, to hyper's HTTP/2 server ([`h2`]).
//! Both call the same tower stack ([`crate::stack`]); no byte is ever
//! judged by two parsers.
//!
//! Limits and timeouts are read from the gateway's configuration as each
//! request begins, so a reload reaches open keep-alive connections from
//! their next request on. HTTP/2's header list limit is announced in the
//! connection's settings, so it changes for new connections only.

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod defer;
mod h1;
mod h2;
mod incoming;
mod limit;
#[cfg_attr(unix, allow(unsafe_code))]
mod listener;
#[cfg(target_os = "linux")]
pub mod open_files;

pub use limit::{ConnectionLimit, Slot};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::body::BoxError;
use crate::gateway::Gateway;
use crate::proxy::headers::Peer;
use crate::socket::Socket;
use crate::stack::{self, Stack};
use listener::Listener;

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
    // Accepted connections inherit it on Linux: no system call per
    // connection to set it (see `run`).
    socket.set_nodelay(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    // Accept a connection once its request has arrived (see `defer`); a
    // kernel without it just accepts at the handshake.
    #[cfg(target_os = "linux")]
    if let Err(e) = defer::defer_accept(&socket) {
        tracing::debug!(error = %e, "TCP_DEFER_ACCEPT not set");
    }
    socket.listen(1024)
}

/// Serves `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish for up to `shutdown_grace`, stops the health
/// checkers and returns.
pub async fn run(listener: TcpListener, gateway: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    // This thread's writes go out together at the end of each turn.
    crate::write_batch::batch_writes();
    // Shared by every worker: the limit is the gateway's, not each worker's.
    let connections = gateway.connection_slots().clone();
    let stack = stack::stack(gateway.clone());
    // Cancelled when shutdown begins: connections finish the request in
    // flight and close.
    let draining = CancellationToken::new();
    // The connections' tasks: those still open when the grace period is over
    // are aborted. (A cancellation token per connection would instead be
    // polled, two locks each time, every time the connection's task runs.)
    let mut open = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let listener = match Listener::new(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "the listening socket cannot be served");
            return;
        }
    };

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
        let slot = match connections.try_acquire() {
            Some(slot) => slot,
            None => {
                tracing::debug!(%remote, "max_connections reached: connection waits for a slot");
                tokio::select! {
                    slot = connections.acquire() => slot,
                    () = &mut shutdown => break,
                }
            }
        };
        // On Linux the connection has it from the listening socket.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let stream = match Listener::bare(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "an accepted connection could not be set up");
                continue;
            }
        };
        let peer = Peer::new(remote);
        let client = Client {
            gateway: gateway.clone(),
            stack: stack::for_client(&stack, peer),
            draining: draining.clone(),
        };
        // The connection's future is large (a few KiB: every layer of the
        // stack is in it) and lives on the heap from its start: the task
        // the accept loop spawns, and reaps, is a small one, which moving
        // into place and out again costs next to nothing.
        open.spawn(async move {
            let _slot = slot;
            let gateway = client.gateway.clone();
            let _open = gateway.metrics().connection_opened();
            if let Err(e) = Box::pin(client.serve(stream)).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }

    drop(listener);
    let grace = gateway.config().gateway.shutdown_grace;
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

/// What a client connection needs: the gateway, its stack for this
/// client, and the signal that shutdown has begun.
struct Client {
    gateway: Arc<Gateway>,
    /// The connection's own stack, which knows its client.
    stack: Stack,
    draining: CancellationToken,
}

impl Client {
    async fn serve(self, stream: Socket) -> Result<(), BoxError> {
        match h1::serve(&self, stream).await? {
            h1::Ended::Closed => Ok(()),
            h1::Ended::Http2(stream, read) => h2::serve(&self, stream, read).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;

    /// On Linux the accept loop leaves `TCP_NODELAY` to the listening
    /// socket: an answer's last segment must not wait for the client's ACK.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_have_nodelay_from_the_listener() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        // Spoken to, so that it is accepted at once (see the next test).
        tokio::io::AsyncWriteExt::write_all(&mut client, b"G")
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// On Linux a connection is accepted once its first bytes are in: of
    /// two connections, the one that spoke is accepted first, though the
    /// silent one finished its handshake before it. (The silent one waits
    /// for about `defer::DEFER`, a second, far longer than this test.)
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn connections_are_accepted_once_they_have_spoken() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = TcpStream::connect(addr).await.unwrap();
        let mut speaking = TcpStream::connect(addr).await.unwrap();
        speaking.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (mut accepted, remote) = listener.accept().await.unwrap();
        assert_eq!(remote, speaking.local_addr().unwrap());
        assert_ne!(remote, silent.local_addr().unwrap());
        let mut first = [0u8; 3];
        accepted.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
    }
}
