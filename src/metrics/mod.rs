//! What the gateway counts (SPEC §9): `GET /metrics` in the Prometheus
//! text format, and the last minute of each service for the status page.
//!
//! Counting sits where the thing counted lives, so the request path pays
//! an atomic add (or one uncontended lock per request) and never a label
//! lookup: a service's requests and durations in its [`ServiceStats`]
//! (shared by every snapshot of the service, like its retry budget), an
//! instance's attempts in its own counters, a circuit's transitions in its
//! breaker, an instance's health checks in its health. A scrape walks the
//! registry and writes every family with `prometheus-client`'s encoder
//! ([`exposition`]); circuit state and routability are read at that
//! moment. So a removed instance's series go with it: nothing outlives the
//! instance that holds them.

mod exposition;
mod service;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

pub use exposition::render;
pub use service::{Recent, ServiceStats};

use crate::body::Body;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::outcome::{Failure, Outcome};

/// Where Prometheus scrapes.
pub const PATH: &str = "/metrics";

/// Serves `GET /metrics`, open like every read.
pub fn serve(
    method: &http::Method,
    gateway: &std::sync::Arc<Gateway>,
) -> Result<http::Response<Body>, GatewayError> {
    crate::status::read_only(method)?;
    Ok(crate::status::answer(
        "text/plain; version=0.0.4; charset=utf-8",
        bytes::Bytes::from(render(gateway)),
    ))
}

/// Upper bounds of the request-duration histogram, in seconds: from a
/// fast local answer (50 µs) to the longest a request may take by default
/// (30 s).
pub const BUCKETS: [f64; 18] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// The gateway-wide figures that belong to no service or instance.
#[derive(Debug, Default)]
pub struct Metrics {
    connections_open: AtomicI64,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// A client connection opened; it counts until the guard drops.
    pub fn connection_opened(&self) -> ConnectionOpen<'_> {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        ConnectionOpen(self)
    }

    pub fn connections_open(&self) -> i64 {
        self.connections_open.load(Ordering::Relaxed)
    }
}

/// One open client connection, counted while it lives.
#[must_use]
pub struct ConnectionOpen<'a>(&'a Metrics);

impl Drop for ConnectionOpen<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an attempt at an instance ended, as `outcome` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A response below 500.
    Success,
    /// A 5xx response.
    ErrorStatus,
    ConnectError,
    Forbidden,
    Timeout,
    /// The response broke off or was not HTTP.
    Broken,
    /// The circuit refused: nothing was sent.
    CircuitOpen,
    /// The client's own request body failed.
    ClientFault,
}

impl AttemptOutcome {
    pub const ALL: [Self; 8] = [
        Self::Success,
        Self::ErrorStatus,
        Self::ConnectError,
        Self::Forbidden,
        Self::Timeout,
        Self::Broken,
        Self::CircuitOpen,
        Self::ClientFault,
    ];

    /// How `outcome` is counted; `None` for an attempt its caller gave up.
    pub fn of(outcome: Outcome) -> Option<Self> {
        Some(match outcome {
            Outcome::Response(status) if status.is_server_error() => Self::ErrorStatus,
            Outcome::Response(_) => Self::Success,
            Outcome::Failed(Failure::Connect) => Self::ConnectError,
            Outcome::Failed(Failure::Forbidden) => Self::Forbidden,
            Outcome::Failed(Failure::Timeout) => Self::Timeout,
            Outcome::Failed(_) => Self::Broken,
            Outcome::Refused => Self::CircuitOpen,
            Outcome::ClientFault(_) => Self::ClientFault,
            Outcome::Cancelled => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ErrorStatus => "error_status",
            Self::ConnectError => "connect_error",
            Self::Forbidden => "forbidden",
            Self::Timeout => "timeout",
            Self::Broken => "broken",
            Self::CircuitOpen => "circuit_open",
            Self::ClientFault => "client_fault",
        }
    }
}

/// One instance's attempts, by outcome.
#[derive(Debug, Default)]
pub struct Attempts([AtomicU64; AttemptOutcome::ALL.len()]);

impl Attempts {
    pub fn count(&self, outcome: AttemptOutcome) {
        self.0[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, outcome: AttemptOutcome) -> u64 {
        self.0[outcome as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_index_their_own_counter() {
        let attempts = Attempts::default();
        for (n, outcome) in AttemptOutcome::ALL.into_iter().enumerate() {
            for _ in 0..=n {
                attempts.count(outcome);
            }
        }
        for (n, outcome) in AttemptOutcome::ALL.into_iter().enumerate() {
            assert_eq!(attempts.get(outcome), n as u64 + 1, "{}", outcome.as_str());
        }
    }

    #[test]
    fn a_cancelled_attempt_is_not_counted_and_5xx_is_an_error() {
        assert_eq!(AttemptOutcome::of(Outcome::Cancelled), None);
        let of =
            |code| AttemptOutcome::of(Outcome::Response(http::StatusCode::from_u16(code).unwrap()));
        assert_eq!(of(200), Some(AttemptOutcome::Success));
        assert_eq!(of(404), Some(AttemptOutcome::Success));
        assert_eq!(of(503), Some(AttemptOutcome::ErrorStatus));
    }

    #[test]
    fn connections_count_while_their_guard_lives() {
        let metrics = Metrics::new();
        let a = metrics.connection_opened();
        let b = metrics.connection_opened();
        assert_eq!(metrics.connections_open(), 2);
        drop(a);
        assert_eq!(metrics.connections_open(), 1);
        drop(b);
        assert_eq!(metrics.connections_open(), 0);
    }
}
