//! An instance's health as active checks see it: the pure threshold state
//! machine (`HealthTracker`) and the shared cell the proxy reads (`Health`).
//!
//! Thresholds follow pingora and Envoy: `unhealthy_threshold` consecutive
//! failures take an instance from `healthy`/`unknown` to `unhealthy`, and
//! `healthy_threshold` consecutive passes take it from `unhealthy`/`unknown`
//! to `healthy`. A new instance is `unknown`, and routable.
//!
//! Besides the status, the cell keeps what the API shows to explain it:
//! the last check ([`LastCheck`]: when, whether it passed, the status or the
//! error, how long it took) and the consecutive counts, so an unhealthy
//! instance can say "3 consecutive failed checks, last: connection refused".
//! Those are plain data behind the mutex; the proxy never reads them.

use std::borrow::Cow;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::checker::Slot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Unknown,
    Healthy,
    Unhealthy,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }

    /// A service's status from its instances': `healthy` if any is healthy,
    /// `unhealthy` if all are unhealthy (and there is one), else `unknown`.
    pub fn of_service(instances: impl Iterator<Item = HealthStatus>) -> Self {
        let (mut any, mut all_unhealthy) = (false, true);
        for status in instances {
            if status == Self::Healthy {
                return Self::Healthy;
            }
            any = true;
            all_unhealthy &= status == Self::Unhealthy;
        }
        if any && all_unhealthy {
            Self::Unhealthy
        } else {
            Self::Unknown
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Healthy,
            2 => Self::Unhealthy,
            _ => Self::Unknown,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Healthy => 1,
            Self::Unhealthy => 2,
        }
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one health check got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    /// An HTTP answer with this status came.
    Status(u16),
    /// No answer came: `connection refused`, `timeout`, `broken response`...
    Error(Cow<'static, str>),
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "status {status}"),
            Self::Error(error) => f.write_str(error),
        }
    }
}

/// One health check: when it started, whether it passed, what it got and
/// how long it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastCheck {
    pub at: SystemTime,
    pub ok: bool,
    pub result: CheckResult,
    pub duration: Duration,
}

/// An instance's health as the API shows it, read at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub status: HealthStatus,
    pub consecutive_failures: u32,
    pub consecutive_passes: u32,
    /// The last passing check.
    pub last_ping: Option<SystemTime>,
    pub last_check: Option<LastCheck>,
}

impl HealthSnapshot {
    /// Why this instance is unhealthy, as one sentence: "unhealthy: 3
    /// consecutive failed checks, last: connection refused". An instance on
    /// its way back (passing, but fewer times than `healthy_threshold`) says
    /// so: "unhealthy: recovering, 1 consecutive passed check, last: status 200".
    pub fn unhealthy_reason(&self) -> String {
        let plural = |n: u32| if n == 1 { "" } else { "s" };
        let count = if self.consecutive_failures > 0 {
            let n = self.consecutive_failures;
            Some(format!("{n} consecutive failed check{}", plural(n)))
        } else if self.consecutive_passes > 0 {
            let n = self.consecutive_passes;
            Some(format!(
                "recovering, {n} consecutive passed check{}",
                plural(n)
            ))
        } else {
            None
        };
        match (count, &self.last_check) {
            (Some(count), Some(last)) => format!("unhealthy: {count}, last: {}", last.result),
            (Some(count), None) => format!("unhealthy: {count}"),
            (None, Some(last)) => format!("unhealthy, last: {}", last.result),
            (None, None) => "unhealthy".into(),
        }
    }
}

/// A status flip, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flip {
    pub from: HealthStatus,
    pub to: HealthStatus,
}

/// Consecutive passes and failures against the two thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTracker {
    status: HealthStatus,
    passes: u32,
    failures: u32,
}

impl Default for HealthTracker {
    fn default() -> Self {
        Self {
            status: HealthStatus::Unknown,
            passes: 0,
            failures: 0,
        }
    }
}

impl HealthTracker {
    pub fn status(&self) -> HealthStatus {
        self.status
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    pub fn consecutive_passes(&self) -> u32 {
        self.passes
    }

    /// Records one check's outcome; returns the flip if the status changed.
    pub fn record(
        &mut self,
        passed: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<Flip> {
        let from = self.status;
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if self.passes >= healthy_threshold {
                self.status = HealthStatus::Healthy;
            }
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= unhealthy_threshold {
                self.status = HealthStatus::Unhealthy;
            }
        }
        (from != self.status).then_some(Flip {
            from,
            to: self.status,
        })
    }
}

/// The health of one instance, shared by its checker, the API and the proxy.
///
/// The proxy reads only `status`, one atomic load; the tracker,
/// `last_ping` and the last check sit behind a mutex that only checks and
/// the API take.
#[derive(Debug, Default)]
pub struct Health {
    status: AtomicU8,
    inner: Mutex<HealthInner>,
    /// Checks recorded, passed and failed (`/metrics`).
    checks: [AtomicU64; 2],
    /// Where the instance stands in the checks' schedule: here rather than
    /// behind an `Arc` of its own, 48 bytes an instance.
    slot: Slot,
}

#[derive(Debug, Default)]
struct HealthInner {
    tracker: HealthTracker,
    last_ping: Option<SystemTime>,
    /// When the instance last became unhealthy, while it is.
    unhealthy_since: Option<SystemTime>,
    last_check: Option<LastCheck>,
}

impl Health {
    pub fn status(&self) -> HealthStatus {
        HealthStatus::from_u8(self.status.load(Ordering::Relaxed))
    }

    /// The last successful check.
    pub fn last_ping(&self) -> Option<SystemTime> {
        self.lock().last_ping
    }

    /// Whether the instance has been unhealthy for at least `span` at `now`.
    pub fn unhealthy_for(&self, span: std::time::Duration, now: SystemTime) -> bool {
        self.lock()
            .unhealthy_since
            .is_some_and(|since| since + span <= now)
    }

    /// The last check, passed or not.
    pub fn last_check(&self) -> Option<LastCheck> {
        self.lock().last_check.clone()
    }

    /// Everything the API shows, read under one lock so it agrees with
    /// itself (the status is the tracker's, which the atomic mirrors).
    pub fn snapshot(&self) -> HealthSnapshot {
        let inner = self.lock();
        HealthSnapshot {
            status: inner.tracker.status(),
            consecutive_failures: inner.tracker.consecutive_failures(),
            consecutive_passes: inner.tracker.consecutive_passes(),
            last_ping: inner.last_ping,
            last_check: inner.last_check.clone(),
        }
    }

    /// Records one check; a passing one is also the new `last_ping`.
    /// Returns the flip, if any.
    pub fn record(
        &self,
        check: LastCheck,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<Flip> {
        let mut inner = self.lock();
        if check.ok {
            inner.last_ping = Some(check.at);
        }
        let flip = inner
            .tracker
            .record(check.ok, healthy_threshold, unhealthy_threshold);
        match flip {
            Some(Flip {
                to: HealthStatus::Unhealthy,
                ..
            }) => inner.unhealthy_since = Some(check.at),
            Some(_) => inner.unhealthy_since = None,
            None => {}
        }
        self.checks[usize::from(!check.ok)].fetch_add(1, Ordering::Relaxed);
        inner.last_check = Some(check);
        self.status
            .store(inner.tracker.status().to_u8(), Ordering::Relaxed);
        flip
    }

    /// Where the instance stands in the checks' schedule.
    pub(super) fn check_slot(&self) -> &Slot {
        &self.slot
    }

    /// How many checks passed and how many failed.
    pub fn checks(&self) -> (u64, u64) {
        let [passed, failed] = &self.checks;
        (
            passed.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        // A panic while holding this lock cannot leave the counters invalid.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HealthStatus::*;

    fn run(
        tracker: &mut HealthTracker,
        outcomes: &[bool],
        healthy: u32,
        unhealthy: u32,
    ) -> Vec<HealthStatus> {
        outcomes
            .iter()
            .map(|&passed| {
                tracker.record(passed, healthy, unhealthy);
                tracker.status()
            })
            .collect()
    }

    #[test]
    fn new_instance_is_unknown_until_a_threshold_is_met() {
        let mut t = HealthTracker::default();
        assert_eq!(t.status(), Unknown);
        assert_eq!(
            run(&mut t, &[false, false, false], 1, 3),
            [Unknown, Unknown, Unhealthy]
        );
        let mut t = HealthTracker::default();
        assert_eq!(run(&mut t, &[true], 1, 3), [Healthy]);
    }

    #[test]
    fn failures_must_be_consecutive() {
        let mut t = HealthTracker::default();
        let seen = run(
            &mut t,
            &[true, false, false, true, false, false, false],
            1,
            3,
        );
        assert_eq!(
            seen,
            [
                Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Unhealthy
            ]
        );
    }

    #[test]
    fn recovery_needs_healthy_threshold_passes() {
        let mut t = HealthTracker::default();
        run(&mut t, &[false, false], 2, 2);
        assert_eq!(t.status(), Unhealthy);
        assert_eq!(
            run(&mut t, &[true, false, true, true], 2, 2),
            [Unhealthy, Unhealthy, Unhealthy, Healthy]
        );
    }

    #[test]
    fn flips_are_reported_once() {
        let mut t = HealthTracker::default();
        assert_eq!(
            t.record(true, 1, 1),
            Some(Flip {
                from: Unknown,
                to: Healthy
            })
        );
        assert_eq!(t.record(true, 1, 1), None);
        assert_eq!(
            t.record(false, 1, 1),
            Some(Flip {
                from: Healthy,
                to: Unhealthy
            })
        );
        assert_eq!(t.record(false, 1, 1), None);
    }

    #[test]
    fn service_status_from_instances() {
        assert_eq!(HealthStatus::of_service([].into_iter()), Unknown);
        assert_eq!(
            HealthStatus::of_service([Unhealthy, Healthy].into_iter()),
            Healthy
        );
        assert_eq!(
            HealthStatus::of_service([Unhealthy, Unhealthy].into_iter()),
            Unhealthy
        );
        assert_eq!(
            HealthStatus::of_service([Unhealthy, Unknown].into_iter()),
            Unknown
        );
    }

    fn check(at: SystemTime, ok: bool, result: CheckResult) -> LastCheck {
        LastCheck {
            at,
            ok,
            result,
            duration: Duration::from_millis(3),
        }
    }

    fn refused() -> CheckResult {
        CheckResult::Error("connection refused".into())
    }

    #[test]
    fn cell_publishes_status_last_ping_and_last_check() {
        let health = Health::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(health.last_ping(), None);
        assert_eq!(health.last_check(), None);
        health.record(check(t0, true, CheckResult::Status(200)), 1, 1);
        assert_eq!((health.status(), health.last_ping()), (Healthy, Some(t0)));
        let t5 = t0 + Duration::from_secs(5);
        health.record(check(t5, false, refused()), 1, 1);
        assert_eq!((health.status(), health.last_ping()), (Unhealthy, Some(t0)));
        assert_eq!(health.last_check(), Some(check(t5, false, refused())));
        let snapshot = health.snapshot();
        assert_eq!(snapshot.status, Unhealthy);
        assert_eq!(
            (snapshot.consecutive_failures, snapshot.consecutive_passes),
            (1, 0)
        );
    }

    #[test]
    fn unhealthy_reason_names_the_count_and_the_last_check() {
        let health = Health::default();
        let t0 = SystemTime::UNIX_EPOCH;
        for _ in 0..3 {
            health.record(check(t0, false, refused()), 1, 3);
        }
        assert_eq!(
            health.snapshot().unhealthy_reason(),
            "unhealthy: 3 consecutive failed checks, last: connection refused"
        );
        health.record(check(t0, false, CheckResult::Status(503)), 1, 3);
        assert_eq!(
            health.snapshot().unhealthy_reason(),
            "unhealthy: 4 consecutive failed checks, last: status 503"
        );
        // On the way back: passing, but not yet healthy_threshold times.
        health.record(check(t0, true, CheckResult::Status(200)), 2, 3);
        assert_eq!(health.status(), Unhealthy);
        assert_eq!(
            health.snapshot().unhealthy_reason(),
            "unhealthy: recovering, 1 consecutive passed check, last: status 200"
        );
        let one = Health::default();
        one.record(check(t0, false, CheckResult::Error("timeout".into())), 1, 1);
        assert_eq!(
            one.snapshot().unhealthy_reason(),
            "unhealthy: 1 consecutive failed check, last: timeout"
        );
    }
}
