//! One service's proxied requests: counts by status, the duration
//! histogram, and the samples its last minute is read from.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::BUCKETS;

/// How far back [`ServiceStats::recent`] looks.
const WINDOW: Duration = Duration::from_secs(60);
/// How often the running totals are sampled for the window.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// One service's last minute, as the status page shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Recent {
    /// Proxied requests per second.
    pub requests_per_sec: f64,
    /// The share of those answered with a 5xx, 0 to 1.
    pub error_ratio: f64,
    /// The 99th percentile of their durations, in seconds (the upper
    /// bound of its histogram bucket); `None` without requests.
    pub p99_seconds: Option<f64>,
}

/// A service's proxied requests, from the moment it was first registered.
/// One uncontended lock per request: the counts by status, the histogram
/// and the window's sampling stay consistent with each other.
#[derive(Debug)]
pub struct ServiceStats {
    inner: Mutex<Inner>,
    retries: AtomicU64,
    budget_exhausted: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    /// Requests by the status answered, in the order first seen.
    statuses: Vec<(u16, u64)>,
    totals: Totals,
    /// Sums of the durations, in seconds.
    seconds: f64,
    /// The totals as they were every `SAMPLE_EVERY` or more, oldest first,
    /// reaching a little past `WINDOW`.
    samples: VecDeque<(Instant, Totals)>,
    last_request: Option<Instant>,
}

/// Running totals the window subtracts.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    requests: u64,
    errors: u64,
    /// Per bucket of [`BUCKETS`], not cumulative; the last is +Inf.
    buckets: [u64; BUCKETS.len() + 1],
}

impl Default for ServiceStats {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl ServiceStats {
    pub fn new(now: Instant) -> Self {
        Self {
            inner: Mutex::new(Inner {
                statuses: Vec::new(),
                totals: Totals::default(),
                seconds: 0.0,
                samples: VecDeque::from([(now, Totals::default())]),
                last_request: None,
            }),
            retries: AtomicU64::new(0),
            budget_exhausted: AtomicU64::new(0),
        }
    }

    /// A request went to another attempt.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that could have been retried was not: the budget was spent.
    pub fn budget_exhausted(&self) {
        self.budget_exhausted.fetch_add(1, Ordering::Relaxed);
    }

    /// Retries, and retries the budget refused.
    pub fn retries(&self) -> (u64, u64) {
        (
            self.retries.load(Ordering::Relaxed),
            self.budget_exhausted.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters: a panic elsewhere cannot leave them half-written.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request answered `status` after `took`, at `now`.
    pub fn record(&self, status: u16, took: Duration, now: Instant) {
        let seconds = took.as_secs_f64();
        let bucket = BUCKETS.partition_point(|&bound| bound < seconds);
        let mut inner = self.lock();
        if let Some(&(last, _)) = inner.samples.back()
            && now.saturating_duration_since(last) >= SAMPLE_EVERY
        {
            let totals = inner.totals;
            inner.samples.push_back((now, totals));
            while inner.samples.len() > 2
                && now.saturating_duration_since(inner.samples[1].0) > WINDOW
            {
                inner.samples.pop_front();
            }
        }
        match inner.statuses.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => inner.statuses.push((status, 1)),
        }
        inner.totals.requests += 1;
        inner.totals.errors += u64::from(status >= 500);
        inner.totals.buckets[bucket] += 1;
        inner.seconds += seconds;
        inner.last_request = Some(now);
    }

    /// Requests by status, ascending.
    pub fn statuses(&self) -> Vec<(u16, u64)> {
        let mut statuses = self.lock().statuses.clone();
        statuses.sort_unstable();
        statuses
    }

    /// The histogram: sum of seconds, count, and `(upper bound, count)`
    /// per bucket, +Inf last; not cumulative (the encoder sums them).
    pub fn histogram(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = self.lock();
        let buckets = BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(inner.totals.buckets)
            .collect();
        (inner.seconds, inner.totals.requests, buckets)
    }

    /// The last minute as of `now`, in steps of `SAMPLE_EVERY`: the
    /// requests since the oldest sample taken within the minute.
    pub fn recent(&self, now: Instant) -> Recent {
        let inner = self.lock();
        if inner
            .last_request
            .is_none_or(|last| now.saturating_duration_since(last) > WINDOW)
        {
            return Recent::default();
        }
        let since = now.checked_sub(WINDOW);
        let (at, base) = inner
            .samples
            .iter()
            .find(|(at, _)| since.is_none_or(|since| *at >= since))
            .or(inner.samples.back())
            .copied()
            .unwrap_or((now, Totals::default()));
        let span = now
            .saturating_duration_since(at)
            .clamp(Duration::from_secs(1), WINDOW);
        let requests = inner.totals.requests - base.requests;
        if requests == 0 {
            return Recent::default();
        }
        let errors = inner.totals.errors - base.errors;
        let rank = (requests as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        let p99 = inner
            .totals
            .buckets
            .iter()
            .zip(base.buckets)
            .position(|(&now, then)| {
                seen += now - then;
                seen >= rank
            })
            .map(|i| BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
        Recent {
            requests_per_sec: requests as f64 / span.as_secs_f64(),
            error_ratio: errors as f64 / requests as f64,
            p99_seconds: p99,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn the_window_counts_the_last_minute_only() {
        let start = Instant::now();
        let stats = ServiceStats::new(start);
        // A burst long ago: 100 slow errors.
        for _ in 0..100 {
            stats.record(503, 2000 * MS, start);
        }
        // Then two minutes of one fast success a second.
        for s in 1..=120 {
            stats.record(200, 3 * MS, start + Duration::from_secs(s));
        }
        let recent = stats.recent(start + Duration::from_secs(120));
        assert_eq!(recent.error_ratio, 0.0);
        assert_eq!(recent.p99_seconds, Some(0.005));
        // About a request a second (the window moves in 5 s steps).
        assert!((0.9..=1.1).contains(&recent.requests_per_sec), "{recent:?}");
        // The histogram keeps everything.
        let (seconds, count, buckets) = stats.histogram();
        assert_eq!(count, 220);
        assert!((seconds - (200.0 + 0.36)).abs() < 1e-6, "{seconds}");
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 220);
        assert_eq!(buckets[6], (0.005, 120));
        assert_eq!(stats.statuses(), vec![(200, 120), (503, 100)]);
    }

    #[tokio::test(start_paused = true)]
    async fn p99_and_errors_within_the_minute() {
        let start = Instant::now();
        let stats = ServiceStats::new(start);
        for i in 0..100u32 {
            let (status, took) = if i == 0 {
                (500, 40 * MS)
            } else {
                (200, MS / 5)
            };
            stats.record(status, took, start + Duration::from_secs(u64::from(i) / 10));
        }
        let recent = stats.recent(start + Duration::from_secs(10));
        assert_eq!(recent.error_ratio, 0.01);
        assert_eq!(recent.p99_seconds, Some(0.00025));
        assert_eq!(recent.requests_per_sec, 10.0);
        // Nothing for a minute and more: nothing recent.
        assert_eq!(
            stats.recent(start + Duration::from_secs(200)),
            Recent::default()
        );
        assert_eq!(ServiceStats::new(start).recent(start), Recent::default());
    }

    #[test]
    fn a_duration_on_a_bound_falls_in_that_bucket() {
        let stats = ServiceStats::default();
        stats.record(200, Duration::from_micros(50), Instant::now());
        stats.record(200, Duration::from_secs(31), Instant::now());
        let (_, _, buckets) = stats.histogram();
        assert_eq!(buckets[0], (0.00005, 1));
        assert_eq!(buckets[BUCKETS.len() - 1], (30.0, 0));
        assert_eq!(buckets[BUCKETS.len()], (f64::INFINITY, 1));
    }
}
