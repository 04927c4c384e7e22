//! The shared state of one instance's circuit, and the permit a request holds.
//!
//! [`Breaker`] wraps the pure [`BreakerMachine`] in a mutex (held for a few
//! instructions, never across an await) and logs each transition. A request
//! takes a [`Permit`] and settles it with exactly one outcome; a permit dropped
//! unsettled (the request was cancelled) gives its half-open probe slot back,
//! so half-open can never wedge.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::state::{
    Admission, Blocked, BreakerMachine, CircuitState, FailureCause, Refused, Transition,
};
use crate::body::BoxError;
use crate::config::CircuitBreakerConfig;
use crate::outcome::{Failure, Outcome};
use crate::upstream::UpstreamError;

#[derive(Debug)]
pub struct Breaker {
    machine: Mutex<BreakerMachine>,
    service: Arc<str>,
    instance: Arc<str>,
    /// Transitions made, by the state entered (`/metrics`).
    transitions: [AtomicU64; 3],
}

impl Breaker {
    pub fn new(config: &CircuitBreakerConfig, service: Arc<str>, instance: Arc<str>) -> Self {
        Self {
            machine: Mutex::new(BreakerMachine::new(config)),
            service,
            instance,
            transitions: Default::default(),
        }
    }

    /// How many times the circuit entered `to`.
    pub fn transitions(&self, to: CircuitState) -> u64 {
        self.transitions[to as usize].load(Ordering::Relaxed)
    }

    /// Takes the thresholds of a reloaded configuration, keeping the
    /// circuit's state ([`BreakerMachine::set_policy`]).
    pub fn set_policy(&self, config: &CircuitBreakerConfig) {
        self.lock().set_policy(config);
    }

    /// The state and consecutive failure count, for the API.
    pub fn snapshot(&self) -> (CircuitState, u32) {
        let machine = self.lock();
        (
            machine.state(Instant::now()),
            machine.consecutive_failures(),
        )
    }

    /// The state, failure count and admission at `now`, read at once, for
    /// the API: the three agree with each other.
    pub fn snapshot_at(&self, now: Instant) -> CircuitSnapshot {
        let machine = self.lock();
        CircuitSnapshot {
            state: machine.state(now),
            consecutive_failures: machine.consecutive_failures(),
            admission: machine.admission(now),
        }
    }

    /// Whether a request would be admitted now (takes no slot).
    pub fn would_admit(&self, now: Instant) -> bool {
        self.lock().would_admit(now)
    }

    /// Whether a request would be admitted at `now`, and why not if not
    /// (takes no slot). The `Ok` path copies nothing out.
    pub fn admission(&self, now: Instant) -> Result<(), Blocked> {
        self.lock().admission(now)
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
            self.transitions[to as usize].fetch_add(1, Ordering::Relaxed);
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

/// One circuit as the API shows it, read under one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitSnapshot {
    pub state: CircuitState,
    pub consecutive_failures: u32,
    pub admission: Result<(), Blocked>,
}

impl FailureCause {
    /// The cause of an attempt's ending that [`Outcome::of`] classified as
    /// `outcome`, an instance failure. Only failures call this, so the
    /// successful request pays nothing for it.
    pub fn of<B>(outcome: Outcome, result: &Result<Response<B>, BoxError>) -> Self {
        match outcome {
            Outcome::Response(status) => Self::Status(status.as_u16()),
            Outcome::Failed(Failure::Timeout) => Self::Timeout,
            Outcome::Failed(Failure::Forbidden) => Self::Forbidden,
            Outcome::Failed(Failure::Connect) => match result {
                Err(error) => match error.downcast_ref::<UpstreamError>() {
                    Some(UpstreamError::Connect(e)) => Self::Connect(e.kind()),
                    _ => Self::Connect(std::io::ErrorKind::Other),
                },
                Ok(_) => Self::Connect(std::io::ErrorKind::Other),
            },
            _ => Self::Broken,
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
    /// Records how the attempt ended, as [`Outcome::of`] classifies it:
    /// the instance's failure counts against it (and is remembered as the
    /// circuit's last failure), any other response for it, and anything
    /// that was not the instance's doing (a client fault, a cancellation)
    /// gives the permit back without counting.
    pub fn settle<B>(self, result: &Result<Response<B>, BoxError>) {
        let outcome = Outcome::of(result);
        if outcome.is_instance_failure() {
            self.failure(FailureCause::of(outcome, result));
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

    pub fn failure(mut self, cause: FailureCause) {
        if let Some(admission) = self.admission.take() {
            let transition = self
                .breaker
                .lock()
                .on_failure(admission, cause, Instant::now());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::TimedOut;
    use crate::upstream::connect::ConnectError;
    use crate::upstream::policy::Refusal;
    use std::io;

    fn settle_failure(result: Result<Response<()>, BoxError>) -> Option<FailureCause> {
        let config = CircuitBreakerConfig {
            failure_threshold: 1,
            ..CircuitBreakerConfig::default()
        };
        let breaker = Arc::new(Breaker::new(&config, "svc".into(), "i-1".into()));
        breaker.try_admit().unwrap().settle(&result);
        match breaker.admission(Instant::now()) {
            Err(Blocked::Open { last_failure, .. }) => last_failure,
            _ => None,
        }
    }

    fn status(code: u16) -> Result<Response<()>, BoxError> {
        let mut response = Response::new(());
        *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
        Ok(response)
    }

    #[test]
    fn settling_a_failure_remembers_its_cause() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let forbidden = ConnectError::Forbidden {
            addr: "10.0.0.1:80".parse().unwrap(),
            why: Refusal::NotAllowed,
        };
        type Case = (Result<Response<()>, BoxError>, Option<FailureCause>);
        let table: Vec<Case> = vec![
            (status(500), Some(FailureCause::Status(500))),
            (status(503), Some(FailureCause::Status(503))),
            (Err(TimedOut.into()), Some(FailureCause::Timeout)),
            (
                Err(UpstreamError::Connect(refused).into()),
                Some(FailureCause::Connect(io::ErrorKind::ConnectionRefused)),
            ),
            (
                Err(UpstreamError::Forbidden(forbidden).into()),
                Some(FailureCause::Forbidden),
            ),
            (
                Err(UpstreamError::Broken("garbage".into()).into()),
                Some(FailureCause::Broken),
            ),
            // Not the instance's failures: the circuit stays closed.
            (status(404), None),
            (
                Err(UpstreamError::ClientBody("client gone".into()).into()),
                None,
            ),
        ];
        for (result, cause) in table {
            let shown = format!("{result:?}");
            assert_eq!(settle_failure(result), cause, "{shown}");
        }
    }
}
