//! The marker error of a refused call.

use std::time::Duration;

/// The circuit refused the call; nothing was sent. `retry_after` is the time
/// until it admits a probe again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    pub retry_after: Duration,
}

impl std::fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "circuit open; retry in {:?}", self.retry_after)
    }
}

impl std::error::Error for CircuitOpen {}
