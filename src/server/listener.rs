//! The listening socket, from which connections are accepted without
//! joining the event loop ([`Socket::bare`]): most never need to (see
//! [`crate::socket`]).
//!
//! The third place in the crate with `unsafe` (on Unix): registering the
//! listening socket with tokio's `AsyncFd`, whose safety condition (the
//! descriptor stays open while registered) the standard library's
//! `TcpListener` meets by owning its descriptor.

#[cfg(unix)]
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
#[cfg(not(unix))]
use tokio::net::TcpStream;

use crate::socket::Socket;

/// A listening socket, registered with the event loop.
#[cfg(unix)]
pub struct Listener(AsyncFd<std::net::TcpListener>);

#[cfg(unix)]
impl Listener {
    pub fn new(listener: TcpListener) -> std::io::Result<Self> {
        // Still non-blocking (tokio's `into_std` keeps it so).
        let listener = listener.into_std()?;
        // SAFETY: the `TcpListener` owns its descriptor, which stays open
        // and names the same socket until the `AsyncFd`, and with it the
        // listener, is dropped (tokio's condition for registering it).
        let registered = unsafe { AsyncFd::register(listener) }?;
        Ok(Self(registered))
    }

    pub async fn accept(&self) -> std::io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            if let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) {
                return accepted;
            }
        }
    }

    /// An accepted connection, ready to be served unregistered.
    pub fn bare(stream: std::net::TcpStream) -> std::io::Result<Socket> {
        stream.set_nonblocking(true)?;
        Ok(Socket::bare(stream))
    }
}

/// Elsewhere, connections join the event loop as they are accepted.
#[cfg(not(unix))]
pub struct Listener(TcpListener);

#[cfg(not(unix))]
impl Listener {
    pub fn new(listener: TcpListener) -> std::io::Result<Self> {
        Ok(Self(listener))
    }

    pub async fn accept(&self) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
        self.0.accept().await
    }

    pub fn bare(stream: TcpStream) -> std::io::Result<Socket> {
        Ok(Socket::from(stream))
    }
}
