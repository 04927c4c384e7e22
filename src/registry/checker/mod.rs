//! Active health checks: `GET <instance url><path>` every `interval` (±10%
//! jitter, so instances registered together do not get checked in lockstep),
//! the first one right at registration.
//!
//! - [`schedule`]: one timeline holds every instance's next check and
//!   starts each check when it is due, in a task of its own, once it holds
//!   one of [`MAX_CONCURRENT_CHECKS`] permits: 100 000 instances never mean
//!   100 000 sockets or tasks at once, and an instance between checks
//!   costs some 20 bytes there, not a sleeping task.
//! - [`kept`]: checks go over kept-alive connections, kept by address
//!   between checks, a bounded number of them in all.
//!
//! An instance removed leaves the wheel at once (a check of it already
//! running ends within its timeout); a shutdown ends every check.
//!
//! Every check is recorded whole ([`LastCheck`]): when, whether it passed,
//! the status when an HTTP answer came or else a short error (`connection
//! refused`, `timeout`...), and how long it took; that is what an unhealthy
//! instance's reason in the API is made of.
//!
//! A check reads its service's policy ([`LivePolicy`]) when it runs, so a
//! reload's path, timeout and thresholds apply from the next one. A reload
//! also watches every instance again: a shorter interval cuts the wait
//! already running, and an interval of zero pauses the checks until a
//! reload sets one again.

mod kept;
mod schedule;

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::{Method, Response};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::LivePolicy;
use super::health::{CheckResult, LastCheck};
use super::instance::Instance;
use crate::body;
use crate::config::HealthCheckConfig;
use crate::upstream::{Outbound, PoolSettings, UpstreamBody, UpstreamError};
use kept::Kept;
use schedule::Schedule;
pub use schedule::Slot;

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
    schedule: Schedule<Watched>,
    /// The wheel's end, until [`HealthChecker::start`] runs it.
    wheel: Arc<Mutex<Option<schedule::Wheel<Watched>>>>,
    kept: Arc<Kept>,
}

/// A checked instance and the policy cell of its service, which the
/// instance's checks read when they run.
#[derive(Clone)]
struct Watched {
    instance: Arc<Instance>,
    /// `None` in what tells the wheel to forget the instance.
    policy: Option<Arc<LivePolicy>>,
}

impl schedule::Checked for Watched {
    fn interval(&self) -> Duration {
        self.policy
            .as_ref()
            .map_or(Duration::ZERO, |policy| policy.load().health_check.interval)
    }

    fn stopped(&self) -> bool {
        self.instance.is_stopped()
    }

    fn slot(&self) -> &Slot {
        self.instance.check_slot()
    }
}

impl HealthChecker {
    /// `shutdown` is the gateway's: cancelling it ends every check.
    pub fn new(shutdown: CancellationToken) -> Self {
        let (removals, rx) = mpsc::unbounded_channel();
        let (schedule, wheel) = Schedule::new();
        Self {
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_CHECKS)),
            shutdown,
            removals,
            removals_rx: Arc::new(Mutex::new(Some(rx))),
            schedule,
            wheel: Arc::new(Mutex::new(Some(wheel))),
            kept: Arc::default(),
        }
    }

    /// Starts the periodic checks, on the current runtime, until the
    /// gateway's shutdown; instances watched before are checked now.
    /// Later calls do nothing.
    pub fn start(&self) {
        let wheel = self
            .wheel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(wheel) = wheel else {
            return;
        };
        let checker = self.clone();
        let run = schedule::run(wheel, self.permits.clone(), move |watched: Watched| {
            let checker = checker.clone();
            async move {
                let Watched { instance, policy } = watched;
                // The wheel starts only instances watched with a policy.
                let Some(policy) = policy else { return };
                let policy = policy.load_full();
                let check = checker.check_holding_permit(&instance, &policy.health_check);
                // A removal stops the checks to come; the one running ends
                // within its timeout. A shutdown ends it now.
                instance.shutdown_token().run_until_cancelled(check).await;
            }
        });
        tokio::spawn(self.shutdown.clone().run_until_cancelled_owned(run));
    }

    /// The instances found unhealthy for their `deregister_after`, each
    /// sent once per failing check past it; the registry takes this once.
    pub fn take_removals(&self) -> Option<mpsc::UnboundedReceiver<Removal>> {
        self.removals_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The gateway's shutdown token, for a new instance: its checks end
    /// with the gateway.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Checks `instance` periodically, first now, until it is removed
    /// ([`HealthChecker::forget`]) or the gateway stops; does nothing
    /// while its service's checks are off. Called again (a reload does,
    /// for every instance), it cuts the wait to the next check if the
    /// interval became shorter, pauses the checks if it became zero, and
    /// resumes them at once if it no longer is.
    pub fn watch(&self, instance: Arc<Instance>, policy: Arc<LivePolicy>) {
        self.schedule.watch(Watched {
            instance,
            policy: Some(policy),
        });
    }

    /// Stops checking `instance`, which was removed or replaced by one at
    /// another URL; it leaves the wheel at once.
    pub fn forget(&self, instance: &Arc<Instance>) {
        instance.check_slot().remove();
        self.schedule.forget(Watched {
            instance: instance.clone(),
            policy: None,
        });
    }

    /// Connections kept between checks now (for tests and diagnostics).
    pub fn kept_connections(&self) -> usize {
        self.kept.count()
    }

    /// Runs one check of `instance` now, records it, and says whether it passed.
    pub async fn check(&self, instance: &Instance, config: &HealthCheckConfig) -> bool {
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = self.permits.acquire().await;
        self.check_holding_permit(instance, config).await
    }

    /// [`HealthChecker::check`], for a caller holding one of the permits.
    async fn check_holding_permit(&self, instance: &Instance, config: &HealthCheckConfig) -> bool {
        let check = {
            // Timed from here: waiting for a permit is not the instance's time.
            let at = SystemTime::now();
            let started = tokio::time::Instant::now();
            // Boxed: a connection's handshake makes this future a few KiB,
            // and `?refresh=true` makes a check future per instance of the
            // service, waiting for permits; boxed, only running ones carry
            // that.
            let result = Box::pin(probe(instance, config, &self.kept)).await;
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

/// One `GET`, bounded by `timeout` from connect to the end of the body:
/// the status when an answer came (any 2xx passes), else why none did.
async fn probe(instance: &Instance, config: &HealthCheckConfig, kept: &Arc<Kept>) -> CheckResult {
    let (path, query) = match config.path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (config.path.as_str(), None),
    };
    let url = instance.url();
    let target = url.target(path, query);
    let request = || {
        let fields = concat!("user-agent: switchyard/", env!("CARGO_PKG_VERSION"), "\r\n");
        Outbound::new(
            Method::GET,
            &target,
            url.host_header(),
            fields.as_bytes(),
            body::empty(),
        )
    };
    let settings = instance.pool().settings();
    let exchange = async {
        let response = match send(instance, request, kept, &settings).await {
            Ok(response) => response,
            Err(error) => return CheckResult::Error(describe(&error)),
        };
        let status = response.status();
        if status.is_success() {
            // Read (a little of) the answer so the instance sees it
            // delivered; a huge or broken body still passes: the status is
            // what counts. Read to its end, the connection is kept for
            // the next check. A failing answer's body is not waited for:
            // its status is the check's result, and its connection closes.
            let mut body = response.into_body();
            let mut left = MAX_CHECK_BODY;
            let whole = loop {
                match body.frame().await {
                    None => break true,
                    Some(Ok(frame)) => {
                        let size = frame.data_ref().map_or(0, bytes::Bytes::len);
                        let Some(rest) = left.checked_sub(size) else {
                            break false;
                        };
                        left = rest;
                    }
                    Some(Err(_)) => break false,
                }
            };
            if whole && let Some(conn) = body.into_connection() {
                kept.keep(url.host_port(), conn, &settings);
            }
        }
        CheckResult::Status(status.as_u16())
    };
    tokio::time::timeout(config.timeout, exchange)
        .await
        .unwrap_or(CheckResult::Error(Cow::Borrowed("timeout")))
}

/// Sends a check over a kept connection to the instance's address, or a
/// new one. A kept connection the instance closed may not show it before
/// the request goes out, so when the kept one gives no answer the check
/// goes out again on a new connection: an instance that closes idle
/// connections before the next check comes does not fail its checks.
async fn send(
    instance: &Instance,
    request: impl Fn() -> Outbound,
    kept: &Kept,
    settings: &PoolSettings,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    if let Some(conn) = kept.take(instance.url().host_port(), settings)
        && let Ok(response) = conn.send(request(), None, settings.idle_timeout).await
    {
        return Ok(response);
    }
    let conn = instance.pool().open().await?;
    Ok(conn.send(request(), None, settings.idle_timeout).await?)
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
