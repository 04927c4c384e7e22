//! The shared state of one instance's circuit, and the permit a request holds.
//!
//! [`Breaker`] wraps the pure [`BreakerMachine`] in a mutex (held for a few
//! instructions, never across an await) and logs each transition. A request
//! takes a [`Permit`] and settles it with exactly one outcome; a permit dropped
//! unsettled (the request was cancelled) gives its half-open probe slot back,
//! so half-open can never wedge.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::state::{Admission, BreakerMachine, CircuitState, Refused, Transition};
use crate::config::CircuitBreakerConfig;
use crate::outcome::Outcome;

#[derive(Debug)]
pub struct Breaker {
    machine: Mutex<BreakerMachine>,
    service: Arc<str>,
    instance: Arc<str>,
}

impl Breaker {
    pub fn new(config: &CircuitBreakerConfig, service: Arc<str>, instance: Arc<str>) -> Self {
        Self {
            machine: Mutex::new(BreakerMachine::new(config)),
            service,
            instance,
        }
    }

    /// The state and consecutive failure count, for the API.
    pub fn snapshot(&self) -> (CircuitState, u32) {
        let machine = self.lock();
        (
            machine.state(Instant::now()),
            machine.consecutive_failures(),
        )
    }

    /// Whether a request would be admitted now (takes no slot).
    pub fn would_admit(&self, now: Instant) -> bool {
        self.lock().would_admit(now)
    }

    /// How long until this circuit admits again, if it refuses now.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        self.lock().retry_after(now)
    }

    /// Admits one request, or says how long until the circuit admits again.
    pub fn try_admit(self: &Arc<Self>) -> Result<Permit, Refused> {
        let (result, transition) = self.lock().try_admit(Instant::now());
        self.log(transition);
        result.map(|admission| Permit {
            breaker: self.clone(),
            admission: Some(admission),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BreakerMachine> {
        // The machine is plain data updated in place; a panic elsewhere while
        // the lock was held cannot leave it half-written.
        self.machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn log(&self, transition: Option<Transition>) {
        if let Some(Transition { from, to }) = transition {
            tracing::info!(
                service = %self.service,
                instance = %self.instance,
                %from,
                %to,
                "circuit {to}"
            );
        }
    }
}

/// One admitted request's claim on the circuit.
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    admission: Option<Admission>,
}

impl Permit {
    /// Records the attempt's outcome: the instance's failure counts
    /// against it, a response that is not one for it, and anything that
    /// was not the instance's doing (a client fault, a cancellation) gives
    /// the permit back without counting.
    pub fn settle(self, outcome: Outcome) {
        if outcome.is_instance_failure() {
            self.failure();
        } else if let Outcome::Response(_) = outcome {
            self.success();
        }
        // Otherwise dropped unsettled: any probe slot comes back.
    }

    pub fn success(mut self) {
        if let Some(admission) = self.admission.take() {
            let transition = self.breaker.lock().on_success(admission);
            self.breaker.log(transition);
        }
    }

    pub fn failure(mut self) {
        if let Some(admission) = self.admission.take() {
            let transition = self.breaker.lock().on_failure(admission, Instant::now());
            self.breaker.log(transition);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            self.breaker.lock().on_cancel(admission);
        }
    }
}
