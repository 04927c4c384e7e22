//! Choosing an instance (SPEC §5, `strategy = "random"`).
//!
//! An instance is routable when its status is not `unhealthy` and its circuit
//! admits a request; among the routable ones the pick is uniform. The caller
//! passes an `exclude` predicate (instances already tried or refused) and the
//! random number generator, so tests can seed it.
//!
//! The common case costs a few random draws, independent of how many
//! instances or services exist: draw an instance uniformly and keep it if it
//! is acceptable (rejection sampling, exactly uniform over the acceptable
//! ones). Only when most instances are unacceptable does it fall back to one
//! pass of reservoir sampling over the list, which is uniform as well.

use std::sync::Arc;

use rand::{Rng, RngExt};
use tokio::time::Instant;

use crate::registry::{HealthStatus, Instance};

/// Draws before falling back to a full pass.
const DRAWS: usize = 4;

/// Whether `instance` may take a request at `now`.
pub fn routable(instance: &Instance, now: Instant) -> bool {
    !instance.is_draining()
        && instance.status() != HealthStatus::Unhealthy
        && instance.breaker().would_admit(now)
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
    use crate::config::Config;
    use crate::registry::{HealthChecker, Registration, Registry};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use std::time::SystemTime;

    fn instances(n: usize) -> Vec<Arc<Instance>> {
        let config = Arc::new(Config::from_toml("[health_check]\ninterval = \"0s\"").unwrap());
        let token = tokio_util::sync::CancellationToken::new();
        let checker = HealthChecker::new(token);
        let registry = Registry::new(config, checker);
        for i in 0..n {
            registry
                .register(Registration {
                    name: "svc".into(),
                    url: format!("http://10.0.0.1:{}", 1000 + i),
                    ..Registration::default()
                })
                .unwrap();
        }
        registry.get("svc").unwrap().instances().to_vec()
    }

    fn mark_unhealthy(instance: &Instance) {
        for _ in 0..3 {
            instance.health().record(false, SystemTime::now(), 1, 3);
        }
    }

    fn open_circuit(instance: &Instance) {
        for _ in 0..3 {
            instance.breaker().try_admit().unwrap().failure();
        }
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
        all[2].health().record(true, SystemTime::now(), 1, 3);
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
}
