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
//!
//! The machine also remembers what the API needs to say why a circuit
//! refuses ([`Blocked`]): until when it is open, after how many failures,
//! and the last failure's kind ([`FailureCause`], a small `Copy` value, so
//! recording it costs the request path no allocation). The sentence itself
//! is only built when a view is rendered ([`Blocked::describe`]).
//!
//! A reload changes the thresholds in place ([`BreakerMachine::set_policy`])
//! and nothing else: the state, the failure count and the generation stay,
//! so a reload neither closes an open circuit nor forgets failures.

use std::fmt;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// What a counted failure was, in a few words: the end of a reason
/// sentence such as "after 3 consecutive failures (last: 500)".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// A response with this status (≥ 500): `500`.
    Status(u16),
    /// No response head within the attempt's time: `timeout`.
    Timeout,
    /// No connection: `connect failed: connection refused`.
    Connect(io::ErrorKind),
    /// The address is outside the upstream policy.
    Forbidden,
    /// The response was broken (reset, garbage): `broken response`.
    Broken,
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "{status}"),
            Self::Timeout => f.write_str("timeout"),
            Self::Connect(io::ErrorKind::TimedOut) => f.write_str("connect timeout"),
            Self::Connect(io::ErrorKind::Other) => f.write_str("connect failed"),
            Self::Connect(kind) => write!(f, "connect failed: {kind}"),
            Self::Forbidden => f.write_str("connect refused by the upstream policy"),
            Self::Broken => f.write_str("broken response"),
        }
    }
}

/// Why a circuit refuses requests at some moment: the data of its reason
/// sentence, copied out of the machine. No allocation until [`describe`].
///
/// [`describe`]: Blocked::describe
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Open until `until`, after `consecutive_failures` failures in a row.
    Open {
        until: Instant,
        consecutive_failures: u32,
        last_failure: Option<FailureCause>,
    },
    /// Half-open with every probe slot taken.
    ProbesInFlight { probes: u32 },
}

impl Blocked {
    /// Time until the circuit admits a probe again, as `Retry-After` needs.
    pub fn retry_after(&self, now: Instant) -> Duration {
        match self {
            Self::Open { until, .. } => until.saturating_duration_since(now),
            // The next slot frees up when a probe ends.
            Self::ProbesInFlight { .. } => Duration::from_secs(1),
        }
    }

    /// The reason as one sentence. `now` and `wall` are the same moment on
    /// the monotonic and the wall clock: the open deadline is kept on the
    /// first (immune to clock steps) and shown on the second, in RFC 3339
    /// UTC to the second, rounded up so that it never names a moment
    /// before the circuit actually half-opens.
    pub fn describe(&self, now: Instant, wall: SystemTime) -> String {
        match *self {
            Self::Open {
                until,
                consecutive_failures,
                last_failure,
            } => {
                let at = ceil_to_second(wall + until.saturating_duration_since(now));
                let plural = if consecutive_failures == 1 { "" } else { "s" };
                let mut out = format!(
                    "circuit open until {} after {consecutive_failures} consecutive failure{plural}",
                    humantime::format_rfc3339_seconds(at)
                );
                if let Some(last) = last_failure {
                    out.push_str(&format!(" (last: {last})"));
                }
                out
            }
            Self::ProbesInFlight { probes: 1 } => "circuit half-open, probe in flight".into(),
            Self::ProbesInFlight { probes } => {
                format!("circuit half-open, {probes} probes in flight")
            }
        }
    }
}

fn ceil_to_second(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) if since.subsec_nanos() > 0 => {
            UNIX_EPOCH + Duration::from_secs(since.as_secs() + 1)
        }
        _ => t,
    }
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
    /// The last failure counted, for the reason an open circuit gives.
    last_failure: Option<FailureCause>,
}

impl BreakerMachine {
    pub fn new(config: &CircuitBreakerConfig) -> Self {
        let mut machine = Self {
            failure_threshold: 1,
            reset_timeout: Duration::ZERO,
            half_open_max_requests: 1,
            phase: Phase::Closed,
            generation: 0,
            consecutive_failures: 0,
            last_failure: None,
        };
        machine.set_policy(config);
        machine
    }

    /// Takes new thresholds, keeping the state: the next failure is judged
    /// against the new `failure_threshold`, the next opening lasts the new
    /// `reset_timeout` (an open period already running keeps its end), and
    /// half-open admits up to the new `half_open_max_requests`.
    pub fn set_policy(&mut self, config: &CircuitBreakerConfig) {
        self.failure_threshold = config.failure_threshold.max(1);
        self.reset_timeout = config.reset_timeout;
        self.half_open_max_requests = config.half_open_max_requests.max(1);
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

    /// The last failure counted, if any.
    pub fn last_failure(&self) -> Option<FailureCause> {
        self.last_failure
    }

    /// Whether `try_admit(now)` would let a request through, without taking a
    /// slot: what the picker asks before choosing an instance.
    pub fn would_admit(&self, now: Instant) -> bool {
        self.admission(now).is_ok()
    }

    /// [`would_admit`](Self::would_admit) with the reason when it would
    /// not: the one decision, so the picker and the API's reason agree.
    pub fn admission(&self, now: Instant) -> Result<(), Blocked> {
        match self.phase {
            Phase::Closed => Ok(()),
            Phase::Open { until } if now >= until => Ok(()),
            Phase::Open { until } => Err(Blocked::Open {
                until,
                consecutive_failures: self.consecutive_failures,
                last_failure: self.last_failure,
            }),
            Phase::HalfOpen { probes_in_flight }
                if probes_in_flight < self.half_open_max_requests =>
            {
                Ok(())
            }
            Phase::HalfOpen { probes_in_flight } => Err(Blocked::ProbesInFlight {
                probes: probes_in_flight,
            }),
        }
    }

    /// Time until this circuit admits a probe, if it is refusing now.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        self.admission(now)
            .err()
            .map(|blocked| blocked.retry_after(now))
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
    /// probe's failure re-opens it for another `reset_timeout`. `cause` is
    /// remembered for the reason an open circuit gives.
    pub fn on_failure(
        &mut self,
        admission: Admission,
        cause: FailureCause,
        now: Instant,
    ) -> Option<Transition> {
        if admission.generation != self.generation {
            return None;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_failure = Some(cause);
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
        m.on_failure(a, FailureCause::Status(500), now)
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
            m.on_failure(probe, FailureCause::Timeout, t5),
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
        assert_eq!(
            m.on_failure(slow2, FailureCause::Timeout, t0 + Duration::from_secs(4)),
            None
        );
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

    fn wall(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn an_open_circuit_says_until_when_after_how_many_and_the_last_failure() {
        let t0 = Instant::now();
        let mut m = machine(3, 30, 1);
        assert_eq!(m.admission(t0), Ok(()));
        let a = admit(&mut m, t0);
        m.on_failure(a, FailureCause::Timeout, t0);
        let a = admit(&mut m, t0);
        m.on_failure(
            a,
            FailureCause::Connect(io::ErrorKind::ConnectionRefused),
            t0,
        );
        assert_eq!(m.admission(t0), Ok(()), "closed below the threshold");
        assert_eq!(fail(&mut m, t0).map(|t| t.to), Some(CircuitState::Open));

        // Ten seconds later, on a wall clock reading 10:00:00.
        let t10 = t0 + Duration::from_secs(10);
        let blocked = m.admission(t10).unwrap_err();
        assert_eq!(
            blocked,
            Blocked::Open {
                until: t0 + Duration::from_secs(30),
                consecutive_failures: 3,
                last_failure: Some(FailureCause::Status(500)),
            }
        );
        assert_eq!(blocked.retry_after(t10), Duration::from_secs(20));
        assert_eq!(m.retry_after(t10), Some(Duration::from_secs(20)));
        assert_eq!(
            blocked.describe(t10, wall("2026-12-02T10:00:00Z")),
            "circuit open until 2026-12-02T10:00:20Z after 3 consecutive failures (last: 500)"
        );
        // A deadline between two seconds is shown at the later one.
        assert_eq!(
            blocked.describe(t10, wall("2026-12-02T10:00:00.250Z")),
            "circuit open until 2026-12-02T10:00:21Z after 3 consecutive failures (last: 500)"
        );

        // A failed probe re-opens it, one failure more, with its cause.
        let t30 = t0 + Duration::from_secs(30);
        assert_eq!(m.admission(t30), Ok(()));
        let probe = admit(&mut m, t30);
        m.on_failure(probe, FailureCause::Broken, t30);
        assert_eq!(
            m.admission(t30)
                .unwrap_err()
                .describe(t30, wall("2026-12-02T10:00:00Z")),
            "circuit open until 2026-12-02T10:00:30Z after 4 consecutive failures (last: broken response)"
        );
    }

    #[test]
    fn a_half_open_circuit_with_its_slots_taken_says_so() {
        let t0 = Instant::now();
        let w = wall("2026-12-02T10:00:00Z");
        let mut m = machine(1, 1, 1);
        fail(&mut m, t0);
        let t1 = t0 + Duration::from_secs(1);
        let probe = admit(&mut m, t1);
        let blocked = m.admission(t1).unwrap_err();
        assert_eq!(blocked, Blocked::ProbesInFlight { probes: 1 });
        assert_eq!(
            blocked.describe(t1, w),
            "circuit half-open, probe in flight"
        );
        assert_eq!(m.retry_after(t1), Some(Duration::from_secs(1)));
        m.on_cancel(probe);
        assert_eq!(m.admission(t1), Ok(()));

        let mut m = machine(1, 1, 2);
        fail(&mut m, t0);
        admit(&mut m, t1);
        admit(&mut m, t1);
        assert_eq!(
            m.admission(t1).unwrap_err().describe(t1, w),
            "circuit half-open, 2 probes in flight"
        );
    }

    #[test]
    fn would_admit_is_the_admission_decision() {
        let t0 = Instant::now();
        let mut m = machine(2, 5, 1);
        let check = |m: &BreakerMachine, at: Instant| {
            assert_eq!(m.would_admit(at), m.admission(at).is_ok());
            assert_eq!(m.retry_after(at).is_none(), m.admission(at).is_ok());
        };
        for step in 0..12u64 {
            let at = t0 + Duration::from_secs(step);
            check(&m, at);
            if let (Ok(a), _) = m.try_admit(at) {
                if step % 3 == 0 {
                    m.on_success(a);
                } else {
                    m.on_failure(a, FailureCause::Status(503), at);
                }
            }
            check(&m, at);
        }
    }

    #[test]
    fn failure_causes_in_words() {
        let table = [
            (FailureCause::Status(500), "500"),
            (FailureCause::Timeout, "timeout"),
            (
                FailureCause::Connect(io::ErrorKind::ConnectionRefused),
                "connect failed: connection refused",
            ),
            (
                FailureCause::Connect(io::ErrorKind::TimedOut),
                "connect timeout",
            ),
            (
                FailureCause::Connect(io::ErrorKind::Other),
                "connect failed",
            ),
            (
                FailureCause::Forbidden,
                "connect refused by the upstream policy",
            ),
            (FailureCause::Broken, "broken response"),
        ];
        for (cause, words) in table {
            assert_eq!(cause.to_string(), words);
        }
    }

    #[test]
    fn new_thresholds_apply_to_the_next_failure_and_keep_the_state() {
        let t0 = Instant::now();
        let mut m = machine(5, 30, 1);
        fail(&mut m, t0);
        fail(&mut m, t0);
        m.set_policy(&CircuitBreakerConfig {
            failure_threshold: 3,
            reset_timeout: Duration::from_secs(2),
            half_open_max_requests: 2,
        });
        assert_eq!(m.consecutive_failures(), 2, "the count stays");
        assert_eq!(m.state(t0), CircuitState::Closed);
        assert!(fail(&mut m, t0).is_some(), "the third failure opens it now");
        assert_eq!(m.retry_after(t0), Some(Duration::from_secs(2)));
        m.set_policy(&CircuitBreakerConfig {
            failure_threshold: 3,
            reset_timeout: Duration::from_secs(60),
            half_open_max_requests: 2,
        });
        assert_eq!(
            m.retry_after(t0),
            Some(Duration::from_secs(2)),
            "an open period already running keeps its end"
        );
        let t2 = t0 + Duration::from_secs(2);
        admit(&mut m, t2);
        admit(&mut m, t2);
        assert!(!m.would_admit(t2), "two probes at most");
    }
}
