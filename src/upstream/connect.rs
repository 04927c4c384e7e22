//! Opening a connection to an instance: the one place the gateway connects
//! anywhere, so the upstream policy applies to proxied calls and health
//! checks alike. Resolve, check each address against the policy, connect to
//! the allowed ones in turn within the timeout, set `TCP_NODELAY`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::policy::{Refusal, UpstreamPolicy, ip_literal};

/// Why no connection was made. Either way nothing was sent.
#[derive(Debug)]
pub enum ConnectError {
    Io(io::Error),
    /// Every address the host resolved to is outside the upstream policy.
    Forbidden {
        addr: SocketAddr,
        why: Refusal,
    },
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Forbidden { addr, why } => write!(f, "{addr} is not allowed: {why}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Resolves `host:port` (an IP literal needs no lookup) and connects to the
/// addresses the policy allows, in turn, all within `timeout`.
pub async fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
    policy: &UpstreamPolicy,
) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let addrs = resolve(host, port).await.map_err(ConnectError::Io)?;
        let mut last = ConnectError::Io(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} has no address"),
        ));
        for addr in addrs {
            if let Err(why) = policy.check(addr) {
                last = ConnectError::Forbidden { addr, why };
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = ConnectError::Io(e),
            }
        }
        Err(last)
    };
    let stream = tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        ConnectError::Io(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
    })??;
    stream.set_nodelay(true).map_err(ConnectError::Io)?;
    Ok(stream)
}

async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Some(ip) = ip_literal(host) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    Ok(tokio::net::lookup_host((host, port)).await?.collect())
}
