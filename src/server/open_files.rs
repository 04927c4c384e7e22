//! The open-files limit. Each client connection holds a socket, its
//! instance connection another, and a large answer being spliced a pipe (two
//! more). Shells and service managers commonly start a process with a soft
//! limit of 1024, far short of what `limits.max_connections` (10 000 by
//! default) needs, under a hard limit many times higher. The gateway raises
//! its soft limit to the hard one at start, as Go programs (Caddy among
//! them) do, and warns when even the hard limit is short.

use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// What the raise did: the soft limit before and after (`None`: none).
#[derive(Debug)]
pub struct Raised {
    pub from: Option<u64>,
    pub to: Option<u64>,
}

/// Raises the soft open-files limit to the hard limit.
pub fn raise() -> io::Result<Raised> {
    let limit = getrlimit(Resource::Nofile);
    let from = limit.current;
    // Linux caps the hard limit at `fs.nr_open`, so it is never infinite
    // there; elsewhere an infinite one is left alone.
    let Some(hard) = limit.maximum else {
        return Ok(Raised { from, to: from });
    };
    if from.is_some_and(|soft| soft >= hard) {
        return Ok(Raised { from, to: from });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )?;
    Ok(Raised {
        from,
        to: Some(hard),
    })
}

/// The soft limit in force (`None`: none).
fn soft() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Warns when the soft limit in force is short of what `max_connections`
/// needs; at start, after [`raise`], and after each reload.
pub fn warn_if_short(max_connections: u32) {
    let needed = needed(max_connections);
    if let Some(limit) = soft().filter(|&limit| limit < needed) {
        tracing::warn!(
            limit,
            max_connections,
            needed,
            "the open files limit is short of what limits.max_connections needs: past it, \
             connections are not accepted and instances cannot be reached; raise the hard limit \
             (ulimit -Hn, systemd's LimitNOFILE) or lower max_connections"
        );
    }
}

/// About how many files a gateway holding `max_connections` client
/// connections keeps open: each one's socket and its instance's, and a
/// margin for the listeners, the store, the logs and health checks.
fn needed(max_connections: u32) -> u64 {
    2 * u64::from(max_connections) + 256
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_counts_twice_over_a_margin() {
        assert_eq!(needed(1), 258);
        assert_eq!(needed(10_000), 20_256);
        assert_eq!(needed(1_000_000), 2_000_256);
    }
}
