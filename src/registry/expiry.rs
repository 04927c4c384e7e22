//! TTL expiry (SPEC §7): one timer structure for every instance registered
//! with a TTL, not a task or a timer each.
//!
//! A single task owns a `DelayQueue` (tokio-util's timer wheel) of the
//! deadlines, keyed by `(service, id)`. Registrations, heartbeats and
//! removals send it [`Arm`] messages; when a deadline passes it reports the
//! instance, and the registry's writer removes it (after checking that no
//! heartbeat renewed it meanwhile). A deadline costs a wheel slot and a map
//! entry, about 150 bytes: 100 000 TTL instances add some 15 MB.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue;

/// An instance, as the wheel knows it.
pub type Key = (Arc<str>, Arc<str>);

/// What the wheel is told.
#[derive(Debug)]
enum Arm {
    /// The instance's deadline is now `at`.
    Set { key: Key, at: Instant },
    /// The instance has no deadline any more.
    Clear(Key),
}

/// The handle the registry keeps: it arms and clears deadlines.
#[derive(Debug, Clone)]
pub struct Expiry {
    tx: mpsc::UnboundedSender<Arm>,
}

/// The wheel's end, to be run by [`run`] once the registry exists.
#[derive(Debug)]
pub struct Wheel {
    rx: mpsc::UnboundedReceiver<Arm>,
}

impl Expiry {
    pub fn new() -> (Self, Wheel) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, Wheel { rx })
    }

    /// Sets (or moves) the deadline of `(service, id)` to `at`.
    pub fn set(&self, service: &Arc<str>, id: &Arc<str>, at: Instant) {
        let key = (service.clone(), id.clone());
        // The wheel is gone only when the gateway is stopping.
        let _ = self.tx.send(Arm::Set { key, at });
    }

    /// Clears the deadline of `(service, id)`, if it had one.
    pub fn clear(&self, service: &Arc<str>, id: &Arc<str>) {
        let _ = self.tx.send(Arm::Clear((service.clone(), id.clone())));
    }
}

/// Runs the wheel until every [`Expiry`] handle is gone, calling
/// `expired` for each instance whose deadline passes.
pub async fn run(mut wheel: Wheel, mut expired: impl FnMut(Key)) {
    let mut queue: DelayQueue<Key> = DelayQueue::new();
    let mut slots: HashMap<Key, delay_queue::Key> = HashMap::new();
    loop {
        tokio::select! {
            arm = wheel.rx.recv() => match arm {
                None => return,
                Some(Arm::Set { key, at }) => match slots.get(&key) {
                    Some(slot) => queue.reset_at(slot, at),
                    None => {
                        let slot = queue.insert_at(key.clone(), at);
                        slots.insert(key, slot);
                    }
                },
                Some(Arm::Clear(key)) => {
                    if let Some(slot) = slots.remove(&key) {
                        queue.remove(&slot);
                    }
                }
            },
            Some(due) = std::future::poll_fn(|cx| queue.poll_expired(cx)), if !queue.is_empty() => {
                let key = due.into_inner();
                slots.remove(&key);
                expired(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(id: &str) -> (Arc<str>, Arc<str>) {
        ("svc".into(), id.into())
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_fire_in_order_and_can_be_moved_or_cleared() {
        let (expiry, wheel) = Expiry::new();
        let (fired_tx, mut fired) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(wheel, move |(_, id)| {
            let _ = fired_tx.send((id.to_string(), Instant::now()));
        }));
        let start = Instant::now();
        let (s, a) = key("a");
        let (_, b) = key("b");
        let (_, c) = key("c");
        expiry.set(&s, &a, start + Duration::from_secs(10));
        expiry.set(&s, &b, start + Duration::from_secs(5));
        expiry.set(&s, &c, start + Duration::from_secs(7));
        // A heartbeat moves b's deadline on; c is removed before its time.
        expiry.set(&s, &b, start + Duration::from_secs(20));
        expiry.clear(&s, &c);
        let (first, at) = fired.recv().await.unwrap();
        assert_eq!((first.as_str(), at - start), ("a", Duration::from_secs(10)));
        let (second, at) = fired.recv().await.unwrap();
        assert_eq!(
            (second.as_str(), at - start),
            ("b", Duration::from_secs(20))
        );
        drop(expiry);
        task.await.unwrap();
        assert!(fired.recv().await.is_none(), "c never fired");
    }
}
