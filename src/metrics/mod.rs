//! What the gateway counts (SPEC §9): `GET /metrics` in the Prometheus
//! text format, and the last minute of each service for the status page.

/// One service's last minute, as the status page shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Recent {
    /// Proxied requests per second.
    pub requests_per_sec: f64,
    /// The share of those answered with a 5xx, 0 to 1.
    pub error_ratio: f64,
    /// The 99th percentile of their durations, in seconds; `None` without
    /// requests.
    pub p99_seconds: Option<f64>,
}

/// The gateway's counters.
#[derive(Debug, Default)]
pub struct Metrics {}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// `service`'s last minute.
    pub fn recent(&self, _service: &str) -> Recent {
        Recent::default()
    }
}
