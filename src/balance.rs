//! Choosing an instance (SPEC §5, `strategy = "random"`), and saying why an
//! instance cannot be chosen (SPEC §7 "Explained routability").
//!
//! An instance is routable when it is not draining, its status is not
//! `unhealthy` and its circuit admits a request. One function decides it,
//! [`routability`], and gives the reason when not; the picker asks
//! [`routable`], which is `routability(..).is_ok()`, and the API renders the
//! reason from [`explain`], which feeds the same decision the values it
//! shows, so the picker and the API cannot disagree. When several reasons
//! hold, the first of draining, unhealthy, circuit is given: an operator's
//! decision first, then what the checks see, then what traffic saw.
//!
//! The picker's path stays cheap: a routable instance costs two atomic
//! loads and the circuit's short lock, as before the reasons existed; a
//! [`NotRoutable`] is a small `Copy` value, and its sentence is built only
//! when a view is rendered ([`Explained::reason`]).
//!
//! Among the routable instances the pick is uniform. The caller passes an
//! `exclude` predicate (instances already tried or refused) and the random
//! number generator, so tests can seed it.
//!
//! The common case costs a few random draws, independent of how many
//! instances or services exist: draw an instance uniformly and keep it if it
//! is acceptable (rejection sampling, exactly uniform over the acceptable
//! ones). Only when most instances are unacceptable does it fall back to one
//! pass of reservoir sampling over the list, which is uniform as well.

use std::sync::Arc;
use std::time::SystemTime;

use rand::{Rng, RngExt};
use tokio::time::Instant;

use crate::breaker::{Blocked, CircuitSnapshot};
use crate::registry::{HealthSnapshot, HealthStatus, Instance, InstanceState};

/// Draws before falling back to a full pass.
const DRAWS: usize = 4;

/// Why an instance takes no new request, first reason first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRoutable {
    /// Set to `draining` by an operator.
    Draining,
    /// Its health checks failed `unhealthy_threshold` times in a row (and
    /// have not passed `healthy_threshold` times since).
    Unhealthy,
    /// Its circuit refuses: open, or half-open with every probe slot taken.
    Circuit(Blocked),
}

/// Whether `instance` may take a new request at `now`, and if not, why.
/// The one decision: [`routable`] and [`explain`] both come here.
pub fn routability(instance: &Instance, now: Instant) -> Result<(), NotRoutable> {
    decide(
        || instance.state(),
        || instance.status(),
        || instance.breaker().admission(now),
    )
}

/// Whether `instance` may take a new request at `now`: the picker's question.
#[inline]
pub fn routable(instance: &Instance, now: Instant) -> bool {
    routability(instance, now).is_ok()
}

/// The decision itself, over its three inputs in order of precedence. Each
/// is read only if the ones before it allow the instance, so the picker
/// skips a draining instance without touching its health or its circuit.
#[inline]
fn decide(
    state: impl FnOnce() -> InstanceState,
    status: impl FnOnce() -> HealthStatus,
    circuit: impl FnOnce() -> Result<(), Blocked>,
) -> Result<(), NotRoutable> {
    if state() == InstanceState::Draining {
        return Err(NotRoutable::Draining);
    }
    if status() == HealthStatus::Unhealthy {
        return Err(NotRoutable::Unhealthy);
    }
    circuit().map_err(NotRoutable::Circuit)
}

/// An instance's live state read once, for a view: the state, health and
/// circuit it shows, and the routability decided from exactly those.
#[derive(Debug, Clone)]
pub struct Explained {
    pub state: InstanceState,
    pub health: HealthSnapshot,
    pub circuit: CircuitSnapshot,
    pub routability: Result<(), NotRoutable>,
    /// The moment it was read, on the monotonic clock.
    pub at: Instant,
}

/// Reads `instance` for a view: the same decision as [`routability`], made
/// from the snapshots the view shows, so a view never says `routable: true`
/// next to `status: unhealthy`.
pub fn explain(instance: &Instance, now: Instant) -> Explained {
    let state = instance.state();
    let health = instance.health().snapshot();
    let circuit = instance.breaker().snapshot_at(now);
    let routability = decide(|| state, || health.status, || circuit.admission);
    Explained {
        state,
        health,
        circuit,
        routability,
        at: now,
    }
}

impl Explained {
    pub fn is_routable(&self) -> bool {
        self.routability.is_ok()
    }

    /// `None` when routable, else why not in one sentence:
    /// `"draining"`,
    /// `"unhealthy: 3 consecutive failed checks, last: connection refused"`,
    /// `"circuit open until 2026-12-02T10:00:30Z after 3 consecutive failures (last: 500)"`,
    /// `"circuit half-open, probe in flight"`. `wall` is the wall-clock time
    /// of the moment this was read, to show the circuit's deadline on.
    pub fn reason(&self, wall: SystemTime) -> Option<String> {
        match self.routability {
            Ok(()) => None,
            Err(NotRoutable::Draining) => Some("draining".into()),
            Err(NotRoutable::Unhealthy) => Some(self.health.unhealthy_reason()),
            Err(NotRoutable::Circuit(blocked)) => Some(blocked.describe(self.at, wall)),
        }
    }
}

/// A uniformly random routable instance not excluded, or `None`.
pub fn pick<'a, R: Rng + ?Sized>(
    instances: &'a [Arc<Instance>],
    now: Instant,
    exclude: impl Fn(&Instance) -> bool,
    rng: &mut R,
) -> Option<&'a Arc<Instance>> {
    let accept = |instance: &Instance| !exclude(instance) && routable(instance, now);
    let n = instances.len();
    if n == 0 {
        return None;
    }
    for _ in 0..DRAWS {
        let candidate = &instances[rng.random_range(0..n)];
        if accept(candidate) {
            return Some(candidate);
        }
    }
    let mut chosen = None;
    let mut seen = 0u32;
    for instance in instances {
        if accept(instance) {
            seen += 1;
            if rng.random_range(0..seen) == 0 {
                chosen = Some(instance);
            }
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::{CircuitState, FailureCause, Permit};
    use crate::config::Config;
    use crate::registry::{
        CheckResult, HealthChecker, LastCheck, Registered, Registration, Registry,
    };
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use std::time::Duration;

    /// Breaker defaults: 3 failures open it for 30 s, one probe at a time.
    fn registry() -> Registry {
        let config = Arc::new(Config::from_toml("[health_check]\ninterval = \"0s\"").unwrap());
        let token = tokio_util::sync::CancellationToken::new();
        Registry::new(config, HealthChecker::new(token))
    }

    fn register(registry: &Registry, port: usize) -> Arc<Instance> {
        let registered = registry
            .register(Registration {
                name: "svc".into(),
                url: format!("http://10.0.0.1:{port}"),
                ..Registration::default()
            })
            .unwrap();
        match registered {
            Registered::Created(i) | Registered::Existing(i) => i,
        }
    }

    fn instances(n: usize) -> Vec<Arc<Instance>> {
        let registry = registry();
        for i in 0..n {
            register(&registry, 1000 + i);
        }
        registry.get("svc").unwrap().instances().to_vec()
    }

    /// A fixed wall-clock moment: 2026-12-02T10:00:00Z.
    fn wall() -> SystemTime {
        humantime::parse_rfc3339("2026-12-02T10:00:00Z").unwrap()
    }

    fn record(instance: &Instance, result: CheckResult) {
        let ok = matches!(result, CheckResult::Status(200));
        let check = LastCheck {
            at: wall(),
            ok,
            result,
            duration: Duration::from_millis(2),
        };
        instance.health().record(check, 1, 3);
    }

    fn mark_unhealthy(instance: &Instance) {
        for _ in 0..3 {
            record(instance, CheckResult::Error("connection refused".into()));
        }
    }

    fn open_circuit(instance: &Instance) {
        for _ in 0..3 {
            let permit = instance.breaker().try_admit().unwrap();
            permit.failure(FailureCause::Status(500));
        }
    }

    fn reason(instance: &Instance) -> Option<String> {
        explain(instance, Instant::now()).reason(wall())
    }

    fn counts(
        all: &[Arc<Instance>],
        draws: usize,
        exclude: impl Fn(&Instance) -> bool,
    ) -> Vec<usize> {
        let mut rng = SmallRng::seed_from_u64(42);
        let now = Instant::now();
        let mut counts = vec![0; all.len()];
        for _ in 0..draws {
            let picked = pick(all, now, &exclude, &mut rng).expect("a routable instance");
            let at = all.iter().position(|i| Arc::ptr_eq(i, picked)).unwrap();
            counts[at] += 1;
        }
        counts
    }

    fn assert_uniform(counts: &[usize], among: &[usize], draws: usize) {
        let expected = draws / among.len();
        for (i, &c) in counts.iter().enumerate() {
            if among.contains(&i) {
                assert!(
                    c.abs_diff(expected) < expected / 10,
                    "instance {i}: {c} of ~{expected}: {counts:?}"
                );
            } else {
                assert_eq!(c, 0, "instance {i} must never be picked: {counts:?}");
            }
        }
    }

    #[tokio::test]
    async fn uniform_over_all_when_all_are_routable() {
        let all = instances(3);
        assert_uniform(&counts(&all, 30_000, |_| false), &[0, 1, 2], 30_000);
    }

    #[tokio::test]
    async fn skips_unhealthy_and_open_circuits_but_not_unknown() {
        let all = instances(4);
        mark_unhealthy(&all[1]);
        open_circuit(&all[3]);
        record(&all[2], CheckResult::Status(200));
        assert_uniform(&counts(&all, 20_000, |_| false), &[0, 2], 20_000);
    }

    #[tokio::test]
    async fn honours_the_exclude_predicate() {
        let all = instances(3);
        let excluded = all[0].clone();
        let c = counts(&all, 20_000, |i| std::ptr::eq(i, &*excluded));
        assert_uniform(&c, &[1, 2], 20_000);
    }

    #[tokio::test]
    async fn fallback_pass_is_uniform_when_few_are_routable() {
        let all = instances(200);
        for (i, instance) in all.iter().enumerate() {
            if ![7, 100, 199].contains(&i) {
                mark_unhealthy(instance);
            }
        }
        assert_uniform(&counts(&all, 30_000, |_| false), &[7, 100, 199], 30_000);
    }

    #[tokio::test]
    async fn none_when_nothing_is_routable() {
        let all = instances(2);
        mark_unhealthy(&all[0]);
        open_circuit(&all[1]);
        let mut rng = SmallRng::seed_from_u64(1);
        assert!(pick(&all, Instant::now(), |_| false, &mut rng).is_none());
        assert!(pick(&[], Instant::now(), |_| false, &mut rng).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn each_reason_in_words() {
        let all = instances(4);
        let now = Instant::now();
        for instance in &all {
            assert_eq!(routability(instance, now), Ok(()));
            assert_eq!(reason(instance), None);
        }

        all[0].set_state(InstanceState::Draining);
        assert_eq!(reason(&all[0]).as_deref(), Some("draining"));

        mark_unhealthy(&all[1]);
        assert_eq!(
            reason(&all[1]).as_deref(),
            Some("unhealthy: 3 consecutive failed checks, last: connection refused")
        );
        record(&all[1], CheckResult::Status(503));
        assert_eq!(
            reason(&all[1]).as_deref(),
            Some("unhealthy: 4 consecutive failed checks, last: status 503")
        );

        // Opened now, for reset_timeout (30 s): until 10:00:30 on the wall
        // clock that reads 10:00:00 now.
        open_circuit(&all[2]);
        assert_eq!(
            reason(&all[2]).as_deref(),
            Some(
                "circuit open until 2026-12-02T10:00:30Z after 3 consecutive failures (last: 500)"
            )
        );

        // Half-open with its one probe slot taken.
        open_circuit(&all[3]);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(reason(&all[3]), None, "half-open admits a probe");
        let probe: Permit = all[3].breaker().try_admit().unwrap();
        assert_eq!(
            reason(&all[3]).as_deref(),
            Some("circuit half-open, probe in flight")
        );
        drop(probe);
        assert_eq!(reason(&all[3]), None, "the slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn draining_comes_before_unhealthy_before_the_circuit() {
        let all = instances(1);
        let instance = &all[0];
        mark_unhealthy(instance);
        open_circuit(instance);
        instance.set_state(InstanceState::Draining);
        let now = Instant::now();
        assert_eq!(routability(instance, now), Err(NotRoutable::Draining));
        assert_eq!(reason(instance).as_deref(), Some("draining"));

        instance.set_state(InstanceState::Active);
        assert_eq!(routability(instance, now), Err(NotRoutable::Unhealthy));
        assert!(reason(instance).unwrap().starts_with("unhealthy: "));

        record(instance, CheckResult::Status(200));
        assert!(matches!(
            routability(instance, now),
            Err(NotRoutable::Circuit(Blocked::Open { .. }))
        ));
        assert!(reason(instance).unwrap().starts_with("circuit open until "));
    }

    /// Every combination of drain state, health and circuit: the picker's
    /// boolean, the decision, the view's decision and the reason agree,
    /// and match the rule written out by hand.
    #[tokio::test(start_paused = true)]
    async fn routable_and_the_reason_agree_on_every_combination() {
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Circuit {
            Closed,
            Open,
            HalfOpenFree,
            HalfOpenBusy,
        }
        let registry = registry();
        let mut port = 1000;
        let mut held = Vec::new();
        let mut cases = Vec::new();
        for state in [InstanceState::Active, InstanceState::Draining] {
            for health in [
                HealthStatus::Unknown,
                HealthStatus::Healthy,
                HealthStatus::Unhealthy,
            ] {
                for circuit in [
                    Circuit::Closed,
                    Circuit::Open,
                    Circuit::HalfOpenFree,
                    Circuit::HalfOpenBusy,
                ] {
                    port += 1;
                    let instance = register(&registry, port);
                    instance.set_state(state);
                    match health {
                        HealthStatus::Unknown => {}
                        HealthStatus::Healthy => record(&instance, CheckResult::Status(200)),
                        HealthStatus::Unhealthy => mark_unhealthy(&instance),
                    }
                    if circuit != Circuit::Closed {
                        open_circuit(&instance);
                    }
                    cases.push((instance, state, health, circuit));
                }
            }
        }
        // Past reset_timeout, then re-open the ones meant to be open and
        // take the probe slot of the busy ones.
        tokio::time::advance(Duration::from_secs(30)).await;
        for (instance, _, _, circuit) in &cases {
            match circuit {
                Circuit::Open => {
                    let probe = instance.breaker().try_admit().unwrap();
                    probe.failure(FailureCause::Timeout);
                }
                Circuit::HalfOpenBusy => held.push(instance.breaker().try_admit().unwrap()),
                Circuit::Closed | Circuit::HalfOpenFree => {}
            }
        }
        let now = Instant::now();
        for (instance, state, health, circuit) in &cases {
            let case = format!("{state:?} {health:?} {circuit:?}");
            assert_eq!(instance.status(), *health, "{case}");
            let expected = *state == InstanceState::Active
                && *health != HealthStatus::Unhealthy
                && matches!(circuit, Circuit::Closed | Circuit::HalfOpenFree);
            let explained = explain(instance, now);
            let reason = explained.reason(wall());
            assert_eq!(routable(instance, now), expected, "{case}");
            assert_eq!(routability(instance, now), explained.routability, "{case}");
            assert_eq!(explained.is_routable(), expected, "{case}");
            assert_eq!(reason.is_none(), expected, "{case}: {reason:?}");
            let wanted_prefix = if *state == InstanceState::Draining {
                "draining"
            } else if *health == HealthStatus::Unhealthy {
                "unhealthy: "
            } else if *circuit == Circuit::Open {
                "circuit open until "
            } else if *circuit == Circuit::HalfOpenBusy {
                "circuit half-open"
            } else {
                ""
            };
            assert!(
                reason.as_deref().unwrap_or("").starts_with(wanted_prefix),
                "{case}: {reason:?}"
            );
            let state_shown = match circuit {
                Circuit::Closed => CircuitState::Closed,
                Circuit::Open => CircuitState::Open,
                _ => CircuitState::HalfOpen,
            };
            assert_eq!(explained.circuit.state, state_shown, "{case}");
        }
        drop(held);
    }

    #[tokio::test]
    async fn a_draining_instance_is_never_picked() {
        let all = instances(3);
        all[1].set_state(InstanceState::Draining);
        assert_uniform(&counts(&all, 30_000, |_| false), &[0, 2], 30_000);

        // Drained all: nothing to pick. Back to active: picked again.
        all[0].set_state(InstanceState::Draining);
        all[2].set_state(InstanceState::Draining);
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..1000 {
            assert!(pick(&all, Instant::now(), |_| false, &mut rng).is_none());
        }
        for instance in &all {
            instance.set_state(InstanceState::Active);
        }
        assert_uniform(&counts(&all, 30_000, |_| false), &[0, 1, 2], 30_000);
    }

    #[tokio::test]
    async fn the_drain_state_is_shared_by_every_snapshot() {
        let registry = registry();
        let before = register(&registry, 1000);
        assert_eq!(before.state(), InstanceState::Active);
        // Registering again with new metadata makes a new snapshot.
        let Registered::Existing(after) = registry
            .register(Registration {
                name: "svc".into(),
                url: "http://10.0.0.1:1000".into(),
                metadata: [("zone".to_string(), "b".to_string())].into(),
                ..Registration::default()
            })
            .unwrap()
        else {
            panic!("the same instance");
        };
        assert!(!Arc::ptr_eq(&before, &after));
        assert_eq!(
            before.set_state(InstanceState::Draining),
            InstanceState::Active
        );
        assert_eq!(after.state(), InstanceState::Draining);
        assert!(!routable(&after, Instant::now()));
        assert_eq!(
            after.set_state(InstanceState::Draining),
            InstanceState::Draining
        );
        after.set_state(InstanceState::Active);
        assert_eq!(before.state(), InstanceState::Active);
    }
}
