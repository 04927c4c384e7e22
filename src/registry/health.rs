//! An instance's health as active checks see it: the pure threshold state
//! machine (`HealthTracker`) and the shared cell the proxy reads (`Health`).
//!
//! Thresholds follow pingora and Envoy: `unhealthy_threshold` consecutive
//! failures take an instance from `healthy`/`unknown` to `unhealthy`, and
//! `healthy_threshold` consecutive passes take it from `unhealthy`/`unknown`
//! to `healthy`. A new instance is `unknown`, and routable.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::SystemTime;

use serde::Serialize;

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
/// The proxy reads only `status`, one atomic load; the tracker and
/// `last_ping` sit behind a mutex that only checks and the API take.
#[derive(Debug, Default)]
pub struct Health {
    status: AtomicU8,
    inner: Mutex<HealthInner>,
}

#[derive(Debug, Default)]
struct HealthInner {
    tracker: HealthTracker,
    last_ping: Option<SystemTime>,
    /// When the instance last became unhealthy, while it is.
    unhealthy_since: Option<SystemTime>,
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

    /// Records a check made at `at`; returns the flip, if any.
    pub fn record(
        &self,
        passed: bool,
        at: SystemTime,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<Flip> {
        let mut inner = self.lock();
        if passed {
            inner.last_ping = Some(at);
        }
        let flip = inner
            .tracker
            .record(passed, healthy_threshold, unhealthy_threshold);
        match flip {
            Some(Flip {
                to: HealthStatus::Unhealthy,
                ..
            }) => inner.unhealthy_since = Some(at),
            Some(_) => inner.unhealthy_since = None,
            None => {}
        }
        self.status
            .store(inner.tracker.status().to_u8(), Ordering::Relaxed);
        flip
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

    #[test]
    fn cell_publishes_status_and_last_ping() {
        let health = Health::default();
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(100);
        assert_eq!(health.last_ping(), None);
        health.record(true, t0, 1, 1);
        assert_eq!((health.status(), health.last_ping()), (Healthy, Some(t0)));
        health.record(false, t0 + std::time::Duration::from_secs(5), 1, 1);
        assert_eq!((health.status(), health.last_ping()), (Unhealthy, Some(t0)));
    }
}
