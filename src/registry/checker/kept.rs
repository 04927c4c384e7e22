//! Connections kept between health checks, by address.
//!
//! A check that opens a connection and closes it costs a connect, an
//! accept and a new connection task at the instance, and leaves a socket
//! in TIME_WAIT; 100 000 instances checked every 30 s make that 3 300 a
//! second. So a check's connection, once its answer has been read to the
//! end and the instance kept it open, is kept here for the next check of
//! any instance at the same `host:port` on the same worker.
//!
//! Kept here rather than in the instance's own pool (where proxied calls
//! would share them), because that pool keeps whatever it is given, one
//! socket per instance at least: a large registry would hold a socket per
//! instance, more than the open-file limit and, on one address, more than
//! the ephemeral ports. Here at most [`MAX_KEPT`] connections are kept in
//! all; a connection beyond that is closed. When there are more instances
//! than that, the ones whose connections are kept keep them (each is
//! reused at its next check), and the others connect each time, as
//! before. Instances that share an address (several per host, or the
//! 100 000 on three addresses of `benches/registry_scale.rs`) share the
//! kept connections, and the checks running at once never hold more
//! connections than there are check permits. Measured there, with the
//! timeline of [`super::schedule`]: registering 100 000 instances with
//! 30 s checks took 3.5-4.3 s against 7.2-8.1 s for the build that
//! connected per check, alternated on one machine (docs/performance.md).
//!
//! A kept connection is closed once idle for `proxy.pool_idle_timeout`, by
//! a task that wakes when the oldest one's time is up, and it is not reused
//! under upstream networks a reload has changed since, nor after the
//! instance closed it. Its read buffer is let go when it is kept, so an
//! idle connection holds a socket and a few dozen bytes, not 64 KiB.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::time::Instant;

use crate::upstream::conn::UpstreamConnection;
use crate::upstream::pool::{self, PoolSettings};

/// Connections kept between checks, in all.
pub const MAX_KEPT: usize = 1024;

/// The connections kept for checks.
#[derive(Default)]
pub struct Kept {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By `host:port`, most recently kept last.
    idle: HashMap<Box<str>, Vec<Idle>>,
    count: usize,
    /// Whether the task closing expired connections is running.
    sweeping: bool,
}

struct Idle {
    conn: UpstreamConnection,
    /// The worker whose thread drives its socket: only that one uses it.
    worker: usize,
    since: Instant,
    /// `since` plus the idle timeout in force when it was kept.
    expires: Instant,
}

impl Kept {
    /// The most recently kept connection to `address` fit for a check
    /// under `settings`, on this worker; the unfit ones met on the way are
    /// closed.
    pub fn take(&self, address: &str, settings: &PoolSettings) -> Option<UpstreamConnection> {
        let (now, worker) = (Instant::now(), crate::upstream::worker());
        let mut inner = self.lock();
        let Inner { idle, count, .. } = &mut *inner;
        let kept = idle.get_mut(address)?;
        let mut found = None;
        while let Some(at) = kept.iter().rposition(|i| i.worker == worker) {
            let mut candidate = kept.remove(at);
            *count -= 1;
            if pool::fit(&mut candidate.conn, candidate.since, now, settings) {
                found = Some(candidate.conn);
                break;
            }
        }
        if kept.is_empty() {
            idle.remove(address);
        }
        found
    }

    /// Keeps `conn` to `address` until a check takes it, unless
    /// [`MAX_KEPT`] are kept already.
    pub fn keep(
        self: &Arc<Self>,
        address: &str,
        mut conn: UpstreamConnection,
        settings: &PoolSettings,
    ) {
        let now = Instant::now();
        conn.shed_read_buffer();
        let mut inner = self.lock();
        if inner.count >= MAX_KEPT {
            return;
        }
        let idle = Idle {
            conn,
            worker: crate::upstream::worker(),
            since: now,
            expires: now + settings.pool_idle_timeout,
        };
        match inner.idle.get_mut(address) {
            Some(kept) => kept.push(idle),
            None => {
                inner.idle.insert(address.into(), vec![idle]);
            }
        }
        inner.count += 1;
        if !inner.sweeping {
            inner.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Connections kept now (for tests and diagnostics).
    pub fn count(&self) -> usize {
        self.lock().count
    }

    /// Closes the connections expired at `now`; when the next one expires,
    /// or `None` (and the sweeper stops) when none is left.
    fn close_expired(&self, now: Instant) -> Option<Instant> {
        let mut inner = self.lock();
        inner.idle.retain(|_, idle| {
            idle.retain(|i| i.expires > now);
            !idle.is_empty()
        });
        inner.count = inner.idle.values().map(Vec::len).sum();
        let next = inner.idle.values().flatten().map(|i| i.expires).min();
        inner.sweeping = next.is_some();
        next
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Connections and a count: nothing a panic could leave inconsistent
        // that the next sweep does not recount.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Closes kept connections as they expire, until none is left.
async fn sweep(kept: Weak<Kept>) {
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        let Some(kept) = kept.upgrade() else {
            return;
        };
        match kept.close_expired(Instant::now()) {
            Some(at) => next = at,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connection to a fresh listener, and the listener's end of it.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    fn settings() -> PoolSettings {
        let config = crate::config::Config::default();
        PoolSettings::new(&config, "127.0.0.1:1".parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_connection_is_taken_for_its_address_only() {
        let settings = settings();
        let kept = Arc::new(Kept::default());
        let (client, _server) = pair().await;
        let conn = UpstreamConnection::new(client, settings.policy.generation());
        kept.keep("a:1", conn, &settings);
        assert!(kept.take("b:1", &settings).is_none());
        assert!(kept.take("a:1", &settings).is_some());
        assert!(kept.take("a:1", &settings).is_none(), "taken once");
        assert_eq!(kept.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_connection_is_closed_once_idle_for_the_pool_idle_timeout() {
        let settings = settings();
        assert_eq!(settings.pool_idle_timeout, Duration::from_secs(90));
        let kept = Arc::new(Kept::default());
        let (client, mut server) = pair().await;
        let conn = UpstreamConnection::new(client, settings.policy.generation());
        kept.keep("a:1", conn, &settings);
        tokio::time::sleep(Duration::from_secs(89)).await;
        assert_eq!(kept.count(), 1, "not yet");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(kept.count(), 0, "closed with no check coming to see it");
        let mut byte = [0u8; 1];
        assert_eq!(
            server.read(&mut byte).await.unwrap(),
            0,
            "the socket closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_past_the_idle_timeout_is_not_taken() {
        let mut settings = settings();
        let kept = Arc::new(Kept::default());
        let (client, _server) = pair().await;
        let conn = UpstreamConnection::new(client, settings.policy.generation());
        kept.keep("a:1", conn, &settings);
        tokio::time::advance(Duration::from_secs(30)).await;
        // A reload shortened the timeout: the sweep has not come yet.
        settings.pool_idle_timeout = Duration::from_secs(20);
        assert!(kept.take("a:1", &settings).is_none());
        assert_eq!(kept.count(), 0, "closed on the way");
    }
}
