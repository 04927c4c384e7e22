//! When each instance is checked next: one timeline for every checked
//! instance, not a task each.
//!
//! A task per instance, sleeping between checks, cost some 500 bytes per
//! instance while it slept (its future, its task, its reload receiver): 57
//! MB across 100 000 instances. Here a single task holds the instances
//! whose check is due later by the millisecond they are due at (a
//! `BTreeMap` of short vectors, some 20 bytes an instance, where
//! tokio-util's `DelayQueue` took 72), and spawns a check when one comes
//! due, once it holds one of the checker's permits, so no more checks are
//! spawned than may run at once.
//!
//! Where an instance stands ([`Slot`]) is kept with the instance, shared
//! by every snapshot of it, and only this task changes it: off (not
//! scheduled: checks off, or stopped), due at a time, come due and waiting
//! for a permit, or running. The task is told ([`Schedule`]):
//!
//! - `watch`: at registration, and for every instance at a reload. An
//!   instance that is off is due at once (the first check runs right at
//!   registration, and a reload that turns checks back on resumes them at
//!   once); one that is due gets its wait cut to the new interval if that
//!   comes sooner, or is taken off when the interval became zero;
//! - `forget`: the instance was removed; it leaves the wheel now, so a
//!   removed instance is not held until its next check would have come;
//! - a check's end: the instance is due again `interval` ±10% from now
//!   (read then, so a reload in between applies), unless it was stopped
//!   meanwhile or the interval became zero.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::RngExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

/// What the wheel needs to know of a checked instance.
pub trait Checked: Clone + Send + 'static {
    /// The interval its checks come at now (zero: off).
    fn interval(&self) -> Duration;
    /// Whether it was removed, or the gateway is stopping.
    fn stopped(&self) -> bool;
    /// Where it stands in the schedule.
    fn slot(&self) -> &Slot;
}

/// Where one instance stands in the schedule, and whether it was removed,
/// in one word: the removal flag in the top bit, the [`State`] below.
/// Kept in the instance's [`super::super::Health`], shared by every
/// snapshot of the instance; only the wheel's task changes the state.
#[derive(Debug, Default)]
pub struct Slot(AtomicU64);

/// Set once, when the instance is removed or replaced: a flag, where a
/// child cancellation token each would cost some 130 bytes.
const REMOVED: u64 = 1 << 63;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not scheduled: checks off, stopped, or not yet watched.
    #[default]
    Off,
    /// In the wheel, due at this tick ([`Timeline`]).
    Due(u64),
    /// Come due, waiting for a permit.
    Ready,
    /// A check of it is running.
    Running,
}

impl State {
    fn encode(self) -> u64 {
        match self {
            Self::Off => 0,
            Self::Ready => 1,
            Self::Running => 2,
            // Ticks are milliseconds since the wheel started: far below
            // 2^62.
            Self::Due(tick) => (tick + 3) & !REMOVED,
        }
    }

    fn decode(word: u64) -> Self {
        match word & !REMOVED {
            0 => Self::Off,
            1 => Self::Ready,
            2 => Self::Running,
            n => Self::Due(n - 3),
        }
    }
}

impl Slot {
    /// Marks the instance removed: it is checked no more.
    pub fn remove(&self) {
        self.0.fetch_or(REMOVED, Ordering::Relaxed);
    }

    pub fn is_removed(&self) -> bool {
        self.0.load(Ordering::Relaxed) & REMOVED != 0
    }

    fn get(&self) -> State {
        State::decode(self.0.load(Ordering::Relaxed))
    }

    fn set(&self, state: State) {
        // Only the wheel's task writes the state; a removal meanwhile only
        // sets its bit, which both steps keep.
        self.0.fetch_and(REMOVED, Ordering::Relaxed);
        self.0.fetch_or(state.encode(), Ordering::Relaxed);
    }
}

enum Command<E> {
    Watch(E),
    Forget(E),
}

/// The handle the checker keeps: it tells the wheel about instances.
#[derive(Debug)]
pub struct Schedule<E> {
    tx: mpsc::UnboundedSender<Command<E>>,
}

impl<E> Clone for Schedule<E> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

/// The wheel's end, to be run by [`run`].
#[derive(Debug)]
pub struct Wheel<E> {
    rx: mpsc::UnboundedReceiver<Command<E>>,
}

impl<E> Schedule<E> {
    pub fn new() -> (Self, Wheel<E>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, Wheel { rx })
    }

    /// Schedules `instance` now if it is off, or moves its next check
    /// to its interval from now if that is sooner (off, if zero).
    pub fn watch(&self, instance: E) {
        // The wheel is gone only when the gateway is stopping.
        let _ = self.tx.send(Command::Watch(instance));
    }

    /// Takes `instance` out of the schedule.
    pub fn forget(&self, instance: E) {
        let _ = self.tx.send(Command::Forget(instance));
    }
}

/// Runs the wheel until every [`Schedule`] handle is gone. A due instance
/// waits for one of `permits`, then `check(instance)` runs in a task of
/// its own holding the permit.
pub async fn run<E, C, F>(mut wheel: Wheel<E>, permits: Arc<Semaphore>, mut check: C)
where
    E: Checked,
    C: FnMut(E) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut timeline: Timeline<E> = Timeline::new();
    // Come due, waiting for a permit, in order.
    let mut ready: VecDeque<E> = VecDeque::new();
    let (done_tx, mut done) = mpsc::unbounded_channel::<E>();
    let mut permit: Option<OwnedSemaphorePermit> = None;
    loop {
        let now = Instant::now();
        while let Some(due) = timeline.pop_due(now) {
            for instance in due {
                instance.slot().set(State::Ready);
                ready.push_back(instance);
            }
        }
        if permit.is_some()
            && let Some(instance) = ready.pop_front()
        {
            if instance.stopped() || instance.interval().is_zero() {
                instance.slot().set(State::Off);
                continue;
            }
            instance.slot().set(State::Running);
            let held = permit.take();
            let running = check(instance.clone());
            let done = done_tx.clone();
            tokio::spawn(async move {
                running.await;
                drop(held);
                // The wheel is gone only when the gateway is stopping.
                let _ = done.send(instance);
            });
            continue;
        }
        let next = timeline.next();
        tokio::select! {
            // Commands first: a burst of registrations is scheduled before
            // the checks it made due are started.
            biased;
            command = wheel.rx.recv() => match command {
                None => return,
                Some(Command::Watch(instance)) => watch(&mut timeline, instance),
                Some(Command::Forget(instance)) => {
                    if let State::Due(tick) = instance.slot().get() {
                        timeline.remove(tick, instance.slot());
                        instance.slot().set(State::Off);
                    }
                    // Ready or running: it is let go when it comes out.
                }
            },
            Some(instance) = done.recv() => {
                instance.slot().set(State::Off);
                let interval = instance.interval();
                if !instance.stopped() && !interval.is_zero() {
                    let tick = timeline.insert(instance.clone(), after(interval));
                    instance.slot().set(State::Due(tick));
                }
            }
            acquired = permits.clone().acquire_owned(), if permit.is_none() && !ready.is_empty() => {
                // The checker never closes its semaphore.
                permit = acquired.ok();
            }
            () = tokio::time::sleep_until(next.unwrap_or(now)), if next.is_some() => {}
        }
    }
}

/// `instance` is watched: due now if off, else due no later than its
/// interval from now, or off if its checks were turned off.
fn watch<E: Checked>(timeline: &mut Timeline<E>, instance: E) {
    if instance.stopped() {
        return;
    }
    let interval = instance.interval();
    match instance.slot().get() {
        State::Off if !interval.is_zero() => {
            let tick = timeline.insert(instance.clone(), Instant::now());
            instance.slot().set(State::Due(tick));
        }
        State::Off | State::Ready | State::Running => {}
        State::Due(tick) => {
            if interval.is_zero() {
                timeline.remove(tick, instance.slot());
                instance.slot().set(State::Off);
                return;
            }
            let sooner = after(interval);
            if timeline.tick(sooner) < tick
                && let Some(instance) = timeline.remove(tick, instance.slot())
            {
                let tick = timeline.insert(instance.clone(), sooner);
                instance.slot().set(State::Due(tick));
            }
        }
    }
}

/// The instances due later, by the millisecond they are due at: about 20
/// bytes an instance (a `DelayQueue` entry is some 72).
struct Timeline<E> {
    origin: Instant,
    due: BTreeMap<u64, Vec<E>>,
}

impl<E: Checked> Timeline<E> {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            due: BTreeMap::new(),
        }
    }

    /// The millisecond `at` falls in, rounded up: an instance is never
    /// checked before its time.
    fn tick(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.origin);
        since.as_millis() as u64 + u64::from(!since.subsec_nanos().is_multiple_of(1_000_000))
    }

    /// Puts `instance` due at `at`; the tick it went under.
    fn insert(&mut self, instance: E, at: Instant) -> u64 {
        let tick = self.tick(at);
        self.due.entry(tick).or_default().push(instance);
        tick
    }

    /// Takes out the instance of `slot` due at `tick`.
    fn remove(&mut self, tick: u64, slot: &Slot) -> Option<E> {
        let due = self.due.get_mut(&tick)?;
        let at = due.iter().position(|i| std::ptr::eq(i.slot(), slot))?;
        let instance = due.swap_remove(at);
        if due.is_empty() {
            self.due.remove(&tick);
        }
        Some(instance)
    }

    /// When the first instance is due.
    fn next(&self) -> Option<Instant> {
        let (&tick, _) = self.due.first_key_value()?;
        Some(self.origin + Duration::from_millis(tick))
    }

    /// The instances of the first tick, if it has come by `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Vec<E>> {
        let (&tick, _) = self.due.first_key_value()?;
        if self.origin + Duration::from_millis(tick) > now {
            return None;
        }
        self.due.pop_first().map(|(_, due)| due)
    }
}

/// When the next check is due: `interval` ±10% from now, so instances
/// registered together are not checked in lockstep.
fn after(interval: Duration) -> Instant {
    let jitter = rand::rng().random_range(0.9..=1.1);
    Instant::now() + interval.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU32;
    use tokio_util::sync::CancellationToken;

    /// An instance as the wheel sees it, its interval set by the test.
    #[derive(Clone, Default)]
    struct Fake {
        interval: Arc<Mutex<Duration>>,
        stop: CancellationToken,
        slot: Arc<Slot>,
    }

    impl Fake {
        fn every(interval: Duration) -> Self {
            let fake = Self::default();
            *fake.interval.lock().unwrap() = interval;
            fake
        }
    }

    impl Checked for Fake {
        fn interval(&self) -> Duration {
            *self.interval.lock().unwrap()
        }
        fn stopped(&self) -> bool {
            self.stop.is_cancelled()
        }
        fn slot(&self) -> &Slot {
            &self.slot
        }
    }

    /// The wheel, with checks that record when they ran.
    fn wheel(
        times: &Arc<Mutex<Vec<Duration>>>,
    ) -> (Schedule<Fake>, impl Future<Output = ()> + use<>) {
        let (schedule, wheel) = Schedule::new();
        let (start, times) = (Instant::now(), times.clone());
        let run = run(wheel, Arc::new(Semaphore::new(4)), move |_| {
            times.lock().unwrap().push(start.elapsed());
            async {}
        });
        (schedule, run)
    }

    #[test]
    fn a_slot_keeps_its_removal_through_every_state() {
        let slot = Slot::default();
        assert_eq!((slot.get(), slot.is_removed()), (State::Off, false));
        slot.set(State::Due(0));
        assert_eq!(slot.get(), State::Due(0));
        slot.remove();
        for state in [
            State::Due(1 << 40),
            State::Ready,
            State::Running,
            State::Off,
        ] {
            slot.set(state);
            assert_eq!((slot.get(), slot.is_removed()), (state, true));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checks_first_at_once_then_every_interval_with_jitter() {
        let times = Arc::new(Mutex::new(Vec::new()));
        let (schedule, run) = wheel(&times);
        schedule.watch(Fake::every(Duration::from_secs(10)));
        // Ends by deadline: the wheel runs while its handle lives.
        let _ = tokio::time::timeout(Duration::from_secs(100), run).await;
        let times = times.lock().unwrap().clone();
        assert_eq!(times[0], Duration::ZERO);
        assert!(times.len() >= 9 && times.len() <= 12, "{times:?}");
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_secs(9) && gap <= Duration::from_millis(11_001),
                "gap {gap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_token_stops_the_checks() {
        let calls = Arc::new(AtomicU32::new(0));
        let (schedule, wheel) = Schedule::new();
        let counted = calls.clone();
        let run = run(wheel, Arc::new(Semaphore::new(4)), move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        let fake = Fake::every(Duration::from_secs(1));
        schedule.watch(fake.clone());
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            fake.stop.cancel();
            tokio::time::sleep(Duration::from_secs(10)).await;
        };
        tokio::select! {
            () = run => panic!("the wheel runs while its handle lives"),
            () = canceller => {}
        }
        assert_eq!(
            fake.slot.get(),
            State::Off,
            "the stopped instance left the wheel"
        );
        let seen = calls.load(Ordering::SeqCst);
        assert!((2..=4).contains(&seen), "{seen}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_instance_leaves_the_wheel_at_once() {
        let times = Arc::new(Mutex::new(Vec::new()));
        let (schedule, run) = wheel(&times);
        let fake = Fake::every(Duration::from_secs(3600));
        schedule.watch(fake.clone());
        let script = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(matches!(fake.slot.get(), State::Due(_)));
            schedule.forget(fake.clone());
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        tokio::select! {
            () = run => panic!("the wheel runs while its handle lives"),
            () = script => {}
        }
        assert_eq!(fake.slot.get(), State::Off);
        assert_eq!(
            Arc::strong_count(&fake.slot),
            1,
            "the wheel holds nothing of it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_cuts_the_wait_pauses_and_resumes_the_checks() {
        let secs = Duration::from_secs;
        let times = Arc::new(Mutex::new(Vec::new()));
        let (schedule, run) = wheel(&times);
        let fake = Fake::every(secs(3600));
        // A reload sets the interval, then watches every instance again.
        let reload = |to: Duration| {
            *fake.interval.lock().unwrap() = to;
            schedule.watch(fake.clone());
        };
        schedule.watch(fake.clone());
        let script = async {
            tokio::time::sleep(secs(10)).await;
            reload(secs(5));
            tokio::time::sleep(secs(20)).await;
            reload(Duration::ZERO);
            tokio::time::sleep(secs(100)).await;
            reload(secs(5));
            tokio::time::sleep(secs(1)).await;
        };
        tokio::select! {
            () = run => panic!("the wheel never ends by itself"),
            () = script => {}
        }
        let times = times.lock().unwrap().clone();
        assert_eq!(times[0], Duration::ZERO);
        assert!(
            (secs(14)..=secs(16)).contains(&times[1]),
            "the hour's wait was cut to 5 s ±10% from the reload: {times:?}"
        );
        assert!(
            !times.iter().any(|t| (secs(31)..secs(130)).contains(t)),
            "paused: {times:?}"
        );
        assert_eq!(
            times.last(),
            Some(&secs(130)),
            "resumed with a check at once: {times:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_checks_run_at_once_than_there_are_permits() {
        let permits = Arc::new(Semaphore::new(2));
        let (schedule, wheel) = Schedule::new();
        let (running, most) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (r, m) = (running.clone(), most.clone());
        let run = run(wheel, permits, move |_| {
            let (r, m) = (r.clone(), m.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                r.fetch_sub(1, Ordering::SeqCst);
            }
        });
        let fakes: Vec<_> = (0..10)
            .map(|_| Fake::every(Duration::from_secs(60)))
            .collect();
        for fake in &fakes {
            schedule.watch(fake.clone());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert!(
            fakes.iter().all(|f| matches!(f.slot.get(), State::Due(_))),
            "each was checked and is due again"
        );
    }
}
