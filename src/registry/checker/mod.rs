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
//!
//! The task reads its service's policy ([`LivePolicy`]) at every check, so
//! a reload's path, timeout and thresholds apply from the next one. A
//! reload also wakes every task: a shorter interval cuts the wait already
//! running, and an interval of zero pauses the checks until a reload sets
//! one again.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::Method;
use http_body_util::{BodyExt, Limited};
use rand::RngExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::LivePolicy;
use super::health::{CheckResult, LastCheck};
use super::instance::Instance;
use crate::body;
use crate::config::HealthCheckConfig;
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
    /// Changed by every reload, for the tasks to look at their policy again.
    reloads: Arc<watch::Sender<()>>,
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
            reloads: Arc::new(watch::channel(()).0),
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
    /// token is cancelled. Does nothing when checks are disabled or already
    /// running. The task shares its service's policy rather than copying
    /// it: a large registry has one task per instance.
    pub fn watch(&self, instance: Arc<Instance>, policy: Arc<LivePolicy>) {
        if policy.load().health_check.interval.is_zero() || !instance.start_checks() {
            return;
        }
        let checker = self.clone();
        let stop = instance.stop_token().clone();
        let reloads = self.reloads.subscribe();
        tokio::spawn(async move {
            let interval = || policy.load().health_check.interval;
            let check = || {
                let policy = policy.load_full();
                let (checker, instance) = (&checker, &instance);
                async move { checker.check(instance, &policy.health_check).await }
            };
            stop.run_until_cancelled(every(interval, reloads, check))
                .await;
        });
    }

    /// Tells every checker task that the policies may have changed.
    pub fn reconfigured(&self) {
        self.reloads.send_replace(());
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

/// Calls `check` now and then again every `interval()` ±10%, forever.
/// Each change of `reloads` reads `interval()` again: a shorter one cuts
/// the wait running, zero pauses the checks, and a paused loop given an
/// interval checks at once.
async fn every<I, F, Fut>(interval: I, mut reloads: watch::Receiver<()>, mut check: F)
where
    I: Fn() -> Duration,
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        if !interval().is_zero() {
            check().await;
        }
        let mut next = after(interval());
        loop {
            let sleep = tokio::time::sleep_until(next.unwrap_or_else(Instant::now));
            tokio::select! {
                () = sleep, if next.is_some() => break,
                changed = reloads.changed() => {
                    if changed.is_err() {
                        // The checker is gone, and its reloads with it.
                        return;
                    }
                    let Some(sooner) = after(interval()) else {
                        next = None;
                        continue;
                    };
                    match next {
                        Some(at) => next = Some(at.min(sooner)),
                        None => break,
                    }
                }
            }
        }
    }
}

/// When the next check is due, `interval` ±10% from now; none when checks
/// are off.
fn after(interval: Duration) -> Option<Instant> {
    if interval.is_zero() {
        return None;
    }
    let jitter = rand::rng().random_range(0.9..=1.1);
    Some(Instant::now() + interval.mul_f64(jitter))
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

    #[tokio::test(start_paused = true)]
    async fn checks_first_at_once_then_every_interval_with_jitter() {
        let start = Instant::now();
        let times = std::sync::Mutex::new(Vec::new());
        let stop = CancellationToken::new();
        let (_reloads, rx) = watch::channel(());
        let run = stop.run_until_cancelled(every(
            || Duration::from_secs(10),
            rx,
            || {
                times.lock().unwrap().push(start.elapsed());
                async { true }
            },
        ));
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
        let (_reloads, rx) = watch::channel(());
        let run = stop.run_until_cancelled(every(
            || Duration::from_secs(1),
            rx,
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { true }
            },
        ));
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            stop.cancel();
        };
        let (result, ()) = tokio::join!(run, canceller);
        assert_eq!(result, None, "the loop ended by cancellation");
        let seen = calls.load(Ordering::SeqCst);
        assert!((2..=4).contains(&seen), "{seen}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_cuts_the_wait_pauses_and_resumes_the_checks() {
        let start = Instant::now();
        let secs = Duration::from_secs;
        let interval = std::sync::Mutex::new(secs(3600));
        let times = std::sync::Mutex::new(Vec::new());
        let (reloads, rx) = watch::channel(());
        let run = every(
            || *interval.lock().unwrap(),
            rx,
            || {
                times.lock().unwrap().push(start.elapsed());
                async { true }
            },
        );
        let reload = |to: Duration| {
            *interval.lock().unwrap() = to;
            reloads.send_replace(());
        };
        let script = async {
            tokio::time::sleep(secs(10)).await;
            reload(secs(5));
            tokio::time::sleep(secs(20)).await;
            reload(Duration::ZERO);
            tokio::time::sleep(secs(100)).await;
            reload(secs(5));
            tokio::time::sleep(secs(1)).await;
        };
        tokio::select! {
            () = run => panic!("the loop never ends by itself"),
            () = script => {}
        }
        let times = times.into_inner().unwrap();
        assert_eq!(times[0], Duration::ZERO);
        assert!(
            (secs(14)..=secs(16)).contains(&times[1]),
            "the hour's wait was cut to 5 s ±10% from the reload: {times:?}"
        );
        assert!(
            !times.iter().any(|t| (secs(31)..secs(130)).contains(t)),
            "paused: {times:?}"
        );
        assert_eq!(
            times.last(),
            Some(&secs(130)),
            "resumed with a check at once: {times:?}"
        );
    }
}
