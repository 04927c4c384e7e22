//! Active health checks: `GET <instance url><path>` every `interval` (±10%
//! jitter, so instances registered together do not get checked in lockstep),
//! the first one right at registration.
//!
//! Each instance has one small task; a semaphore bounds how many checks are
//! on the wire at once, so 100 000 instances never mean 100 000 sockets.
//! Each check opens its own connection and closes it (as HAProxy's checks
//! do): keeping one idle between checks would hold a socket and its buffers
//! per instance, some 8 KiB each across a large registry. A task ends when
//! its instance's stop token is cancelled, which happens when the instance
//! is removed and when the gateway shuts down.
//!
//! Every check is recorded whole ([`LastCheck`]): when, whether it passed,
//! the status when an HTTP answer came or else a short error (`connection
//! refused`, `timeout`...), and how long it took; that is what an unhealthy
//! instance's reason in the API is made of.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::Method;
use http_body_util::{BodyExt, Limited};
use rand::RngExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::health::{CheckResult, LastCheck};
use super::instance::Instance;
use crate::body;
use crate::config::{HealthCheckConfig, ServicePolicy};
use crate::upstream::{Outbound, UpstreamError};

/// Checks on the wire at once, gateway-wide.
pub const MAX_CONCURRENT_CHECKS: usize = 256;

/// A passing check's body is read up to this much.
const MAX_CHECK_BODY: usize = 64 * 1024;

/// An instance to remove, as `(service, id)`.
pub type Removal = (Arc<str>, Arc<str>);

#[derive(Clone)]
pub struct HealthChecker {
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    /// Instances unhealthy for their `deregister_after`, for the registry
    /// to remove ([`HealthChecker::take_removals`]).
    removals: mpsc::UnboundedSender<Removal>,
    removals_rx: Arc<Mutex<Option<mpsc::UnboundedReceiver<Removal>>>>,
}

impl HealthChecker {
    /// `shutdown` is the gateway's: cancelling it ends every checker task.
    pub fn new(shutdown: CancellationToken) -> Self {
        let (removals, rx) = mpsc::unbounded_channel();
        Self {
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS)),
            shutdown,
            removals,
            removals_rx: Arc::new(Mutex::new(Some(rx))),
        }
    }

    /// The instances found unhealthy for their `deregister_after`, each
    /// sent once per failing check past it; the registry takes this once.
    pub fn take_removals(&self) -> Option<mpsc::UnboundedReceiver<Removal>> {
        self.removals_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// A stop token for a new instance, cancelled with the gateway's.
    pub fn stop_token(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// Starts checking `instance` periodically, first now, until its stop
    /// token is cancelled. Does nothing when checks are disabled.
    /// The task shares its service's policy rather than copying it: a large
    /// registry has one task per instance.
    pub fn watch(&self, instance: Arc<Instance>, policy: Arc<ServicePolicy>) {
        let interval = policy.health_check.interval;
        if interval.is_zero() {
            return;
        }
        let checker = self.clone();
        let stop = instance.stop_token().clone();
        tokio::spawn(async move {
            let config = &policy.health_check;
            stop.run_until_cancelled(every(interval, || checker.check(&instance, config)))
                .await;
        });
    }

    /// Runs one check of `instance` now, records it, and says whether it passed.
    pub async fn check(&self, instance: &Instance, config: &HealthCheckConfig) -> bool {
        let check = {
            // The semaphore is never closed, so acquiring cannot fail.
            let _permit = self.permits.acquire().await;
            // Timed from here: waiting for a permit is not the instance's time.
            let at = SystemTime::now();
            let started = tokio::time::Instant::now();
            // Boxed: a connection's handshake makes this future a few KiB,
            // and every instance's checker task would carry that size while
            // it sleeps between checks; boxed, only running checks do.
            let result = Box::pin(probe(instance, config)).await;
            LastCheck {
                at,
                ok: matches!(result, CheckResult::Status(status) if (200..300).contains(&status)),
                result,
                duration: started.elapsed(),
            }
        };
        let (passed, at) = (check.ok, check.at);
        // Checks come round even when no traffic does: a good moment to
        // close the instance's connections idle past their timeout.
        instance.pool().prune();
        let flip =
            instance
                .health()
                .record(check, config.healthy_threshold, config.unhealthy_threshold);
        if let Some(flip) = flip {
            tracing::info!(
                service = instance.service(),
                instance = instance.id(),
                url = instance.url().as_str(),
                from = %flip.from,
                to = %flip.to,
                "instance {}",
                flip.to
            );
        }
        let after = config.deregister_after;
        if !passed && !after.is_zero() && instance.health().unhealthy_for(after, at) {
            // The registry checks again before it removes, in its writer.
            let _ = self
                .removals
                .send((instance.service_name().clone(), instance.id_name().clone()));
        }
        passed
    }
}

/// Calls `check` now and then again every `interval` ±10%, forever.
async fn every<F, Fut>(interval: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        check().await;
        let jitter = rand::rng().random_range(0.9..=1.1);
        tokio::time::sleep(interval.mul_f64(jitter)).await;
    }
}

/// One `GET`, bounded by `timeout` from connect to the end of the body:
/// the status when an answer came (any 2xx passes), else why none did.
async fn probe(instance: &Instance, config: &HealthCheckConfig) -> CheckResult {
    let (path, query) = match config.path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (config.path.as_str(), None),
    };
    let url = instance.url();
    let fields = concat!(
        "user-agent: switchyard/",
        env!("CARGO_PKG_VERSION"),
        "\r\nconnection: close\r\n"
    );
    let request = Outbound::new(
        Method::GET,
        &url.target(path, query),
        url.host_header(),
        fields.as_bytes(),
        body::empty(),
    );
    let exchange = async {
        let response = match instance.pool().send_once(request).await {
            Ok(response) => response,
            Err(error) => return CheckResult::Error(describe(&error)),
        };
        let status = response.status();
        if status.is_success() {
            // Read (a little of) the answer so the instance sees it
            // delivered; a huge or broken body still passes: the status is
            // what counts.
            let _ = Limited::new(response.into_body(), MAX_CHECK_BODY)
                .collect()
                .await;
        }
        CheckResult::Status(status.as_u16())
    };
    tokio::time::timeout(config.timeout, exchange)
        .await
        .unwrap_or(CheckResult::Error(Cow::Borrowed("timeout")))
}

/// A failed check's error in a few words: `connection refused`, `connect
/// timed out`, `broken response: ...`. An operating-system error is named
/// by its kind, without its number.
fn describe(error: &UpstreamError) -> Cow<'static, str> {
    fn io(e: &std::io::Error) -> Cow<'static, str> {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Cow::Borrowed("connection refused"),
            kind if e.raw_os_error().is_some() => Cow::Owned(kind.to_string()),
            _ => Cow::Owned(e.to_string()),
        }
    }
    match error {
        UpstreamError::Connect(e) => io(e),
        UpstreamError::Forbidden(_) => Cow::Borrowed("connect refused by the upstream policy"),
        UpstreamError::Broken(e) => match e.downcast_ref::<std::io::Error>() {
            Some(e) => Cow::Owned(format!("broken response: {}", io(e))),
            None => Cow::Owned(format!("broken response: {e}")),
        },
        // A check sends no body, so this cannot happen; say what it would be.
        UpstreamError::ClientBody(_) => Cow::Borrowed("request body failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn checks_first_at_once_then_every_interval_with_jitter() {
        let start = Instant::now();
        let times = std::sync::Mutex::new(Vec::new());
        let stop = CancellationToken::new();
        let run = stop.run_until_cancelled(every(Duration::from_secs(10), || {
            times.lock().unwrap().push(start.elapsed());
            async { true }
        }));
        // Ends by deadline: the loop itself never returns.
        let _ = tokio::time::timeout(Duration::from_secs(100), run).await;
        let times = times.into_inner().unwrap();
        assert_eq!(times[0], Duration::ZERO);
        assert!(times.len() >= 9 && times.len() <= 12, "{times:?}");
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_secs(9) && gap <= Duration::from_millis(11_001),
                "gap {gap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_token_stops_the_loop() {
        let calls = AtomicU32::new(0);
        let stop = CancellationToken::new();
        let run = stop.run_until_cancelled(every(Duration::from_secs(1), || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { true }
        }));
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            stop.cancel();
        };
        let (result, ()) = tokio::join!(run, canceller);
        assert_eq!(result, None, "the loop ended by cancellation");
        let seen = calls.load(Ordering::SeqCst);
        assert!((2..=4).contains(&seen), "{seen}");
    }
}
