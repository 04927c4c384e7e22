//! The circuit breaker's state machine: plain data, every method takes `now`,
//! so each transition is testable with `#[test]` alone.
//!
//! Admission, classification and the trip policy are kept apart (as in
//! linkerd's breaker): the tower service classifies a response as a success
//! or a failure; this machine decides who is admitted and when to trip.
//!
//! Every admission carries the generation of the circuit it was admitted
//! under. An outcome from an older generation is ignored: a slow request let
//! through while closed must not close a circuit that has since opened, nor
//! re-open one a probe has since closed.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::CircuitBreakerConfig;

/// The circuit as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

impl std::fmt::Display for CircuitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request let through, to be settled with exactly one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    generation: u64,
    probe: bool,
}

impl Admission {
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// Why a request was refused: the circuit is open (or its probe slots are
/// taken) and `retry_after` is the time until it next admits a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub retry_after: Duration,
}

/// A change of state worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: CircuitState,
    pub to: CircuitState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probes_in_flight: u32 },
}

#[derive(Debug, Clone)]
pub struct BreakerMachine {
    failure_threshold: u32,
    reset_timeout: Duration,
    half_open_max_requests: u32,
    phase: Phase,
    generation: u64,
    consecutive_failures: u32,
}

impl BreakerMachine {
    pub fn new(config: &CircuitBreakerConfig) -> Self {
        Self {
            failure_threshold: config.failure_threshold.max(1),
            reset_timeout: config.reset_timeout,
            half_open_max_requests: config.half_open_max_requests.max(1),
            phase: Phase::Closed,
            generation: 0,
            consecutive_failures: 0,
        }
    }

    /// The state at `now`: an open circuit whose timeout has run out reads as
    /// half-open even before the next request moves it there.
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { until } if now >= until => CircuitState::HalfOpen,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Whether `try_admit(now)` would let a request through, without taking a
    /// slot: what the picker asks before choosing an instance.
    pub fn would_admit(&self, now: Instant) -> bool {
        match self.phase {
            Phase::Closed => true,
            Phase::Open { until } => now >= until,
            Phase::HalfOpen { probes_in_flight } => probes_in_flight < self.half_open_max_requests,
        }
    }

    /// Time until this circuit admits a probe, if it is refusing now.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match self.phase {
            Phase::Closed => None,
            Phase::Open { until } if now < until => Some(until - now),
            Phase::Open { .. } => None,
            Phase::HalfOpen { probes_in_flight }
                if probes_in_flight >= self.half_open_max_requests =>
            {
                // A probe is in flight; the next slot frees up when it ends.
                Some(Duration::from_secs(1))
            }
            Phase::HalfOpen { .. } => None,
        }
    }

    /// Admits a request or refuses it. An open circuit past its timeout moves
    /// to half-open here, and the request becomes one of its probes.
    pub fn try_admit(&mut self, now: Instant) -> (Result<Admission, Refused>, Option<Transition>) {
        let mut transition = None;
        if let Phase::Open { until } = self.phase {
            if now < until {
                return (
                    Err(Refused {
                        retry_after: until - now,
                    }),
                    None,
                );
            }
            transition = self.enter(Phase::HalfOpen {
                probes_in_flight: 0,
            });
        }
        let result = match &mut self.phase {
            Phase::Closed => Ok(Admission {
                generation: self.generation,
                probe: false,
            }),
            Phase::HalfOpen { probes_in_flight }
                if *probes_in_flight < self.half_open_max_requests =>
            {
                *probes_in_flight += 1;
                Ok(Admission {
                    generation: self.generation,
                    probe: true,
                })
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => Err(Refused {
                retry_after: Duration::from_secs(1),
            }),
        };
        (result, transition)
    }

    /// A success: resets the failure count; a probe's success closes the circuit.
    pub fn on_success(&mut self, admission: Admission) -> Option<Transition> {
        if admission.generation != self.generation {
            return None;
        }
        self.consecutive_failures = 0;
        match self.phase {
            Phase::HalfOpen { .. } => self.enter(Phase::Closed),
            _ => None,
        }
    }

    /// A failure: `failure_threshold` in a row open a closed circuit; a
    /// probe's failure re-opens it for another `reset_timeout`.
    pub fn on_failure(&mut self, admission: Admission, now: Instant) -> Option<Transition> {
        if admission.generation != self.generation {
            return None;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.phase {
            Phase::Closed if self.consecutive_failures >= self.failure_threshold => {
                self.enter(Phase::Open {
                    until: now + self.reset_timeout,
                })
            }
            Phase::HalfOpen { .. } => self.enter(Phase::Open {
                until: now + self.reset_timeout,
            }),
            _ => None,
        }
    }

    /// A request dropped before its outcome was known (the client went away):
    /// frees its probe slot and counts as neither success nor failure.
    pub fn on_cancel(&mut self, admission: Admission) {
        if admission.generation != self.generation || !admission.probe {
            return;
        }
        if let Phase::HalfOpen { probes_in_flight } = &mut self.phase {
            *probes_in_flight = probes_in_flight.saturating_sub(1);
        }
    }

    fn enter(&mut self, phase: Phase) -> Option<Transition> {
        let from = self.phase.state();
        self.phase = phase;
        self.generation += 1;
        Some(Transition {
            from,
            to: phase.state(),
        })
    }
}

impl Phase {
    /// The state this phase is in, before any timeout is taken into account.
    fn state(self) -> CircuitState {
        match self {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(failures: u32, reset_secs: u64, probes: u32) -> BreakerMachine {
        BreakerMachine::new(&CircuitBreakerConfig {
            failure_threshold: failures,
            reset_timeout: Duration::from_secs(reset_secs),
            half_open_max_requests: probes,
        })
    }

    fn admit(m: &mut BreakerMachine, now: Instant) -> Admission {
        m.try_admit(now).0.expect("admitted")
    }

    fn fail(m: &mut BreakerMachine, now: Instant) -> Option<Transition> {
        let a = admit(m, now);
        m.on_failure(a, now)
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let now = Instant::now();
        let mut m = machine(3, 30, 1);
        fail(&mut m, now);
        fail(&mut m, now);
        let a = admit(&mut m, now);
        m.on_success(a);
        assert_eq!(m.consecutive_failures(), 0);
        assert_eq!(fail(&mut m, now), None);
        assert_eq!(fail(&mut m, now), None);
        assert_eq!(
            fail(&mut m, now),
            Some(Transition {
                from: CircuitState::Closed,
                to: CircuitState::Open
            })
        );
        assert_eq!(m.state(now), CircuitState::Open);
        assert_eq!(m.consecutive_failures(), 3);
    }

    #[test]
    fn open_refuses_until_reset_timeout_then_half_opens() {
        let t0 = Instant::now();
        let mut m = machine(1, 30, 1);
        fail(&mut m, t0);
        let later = t0 + Duration::from_secs(10);
        assert!(!m.would_admit(later));
        assert_eq!(
            m.try_admit(later).0,
            Err(Refused {
                retry_after: Duration::from_secs(20)
            })
        );
        assert_eq!(m.retry_after(later), Some(Duration::from_secs(20)));
        let t30 = t0 + Duration::from_secs(30);
        assert_eq!(m.state(t30), CircuitState::HalfOpen);
        assert!(m.would_admit(t30));
        let (probe, transition) = m.try_admit(t30);
        assert!(probe.unwrap().is_probe());
        assert_eq!(
            transition,
            Some(Transition {
                from: CircuitState::Open,
                to: CircuitState::HalfOpen
            })
        );
    }

    #[test]
    fn half_open_admits_at_most_max_probes() {
        let t0 = Instant::now();
        let mut m = machine(1, 1, 2);
        fail(&mut m, t0);
        let t1 = t0 + Duration::from_secs(1);
        let p1 = admit(&mut m, t1);
        let _p2 = admit(&mut m, t1);
        assert!(!m.would_admit(t1));
        assert!(m.try_admit(t1).0.is_err());
        // A cancelled probe gives its slot back.
        m.on_cancel(p1);
        assert!(m.would_admit(t1));
        admit(&mut m, t1);
        assert!(m.try_admit(t1).0.is_err());
    }

    #[test]
    fn probe_success_closes_and_failure_reopens() {
        let t0 = Instant::now();
        let mut m = machine(1, 5, 1);
        fail(&mut m, t0);
        let t5 = t0 + Duration::from_secs(5);
        let probe = admit(&mut m, t5);
        assert_eq!(
            m.on_failure(probe, t5),
            Some(Transition {
                from: CircuitState::HalfOpen,
                to: CircuitState::Open
            })
        );
        assert!(!m.would_admit(t5 + Duration::from_secs(4)));
        let t10 = t5 + Duration::from_secs(5);
        let probe = admit(&mut m, t10);
        assert_eq!(
            m.on_success(probe),
            Some(Transition {
                from: CircuitState::HalfOpen,
                to: CircuitState::Closed
            })
        );
        assert_eq!(m.state(t10), CircuitState::Closed);
        assert_eq!(m.consecutive_failures(), 0);
    }

    #[test]
    fn outcomes_from_an_older_generation_are_ignored() {
        let t0 = Instant::now();
        let mut m = machine(2, 5, 1);
        let slow = admit(&mut m, t0);
        fail(&mut m, t0);
        fail(&mut m, t0);
        assert_eq!(m.state(t0), CircuitState::Open);
        // The slow request admitted while closed succeeds late: still open.
        assert_eq!(m.on_success(slow), None);
        assert_eq!(m.state(t0), CircuitState::Open);
        // A late failure does not extend the open period either.
        let slow2 = Admission {
            generation: 0,
            probe: false,
        };
        assert_eq!(m.on_failure(slow2, t0 + Duration::from_secs(4)), None);
        assert!(m.would_admit(t0 + Duration::from_secs(5)));
    }

    #[test]
    fn cancelled_request_while_closed_changes_nothing() {
        let t0 = Instant::now();
        let mut m = machine(1, 5, 1);
        let a = admit(&mut m, t0);
        m.on_cancel(a);
        assert_eq!(m.state(t0), CircuitState::Closed);
        assert_eq!(m.consecutive_failures(), 0);
    }
}
