//! `limits.max_connections`: one slot per client connection, shared by
//! every worker, and resizable while connections hold slots.
//!
//! A semaphore holds the free slots. Growing the limit adds slots at once.
//! Shrinking it takes the free slots at once and the rest as connections
//! close: a connection already open is never cut to honour a smaller limit,
//! and until enough have closed the gateway admits no new one. The limit in
//! force is always free slots + slots held − slots still owed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Semaphore;

/// The client-connection limit. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    free: Semaphore,
    /// Slots a smaller limit still has to take back from connections that
    /// hold them.
    owed: AtomicUsize,
    /// The limit; changed under this lock, one resize at a time.
    limit: Mutex<usize>,
}

/// One connection's slot, given back (or kept by a shrunken limit) when
/// dropped.
#[derive(Debug)]
pub struct Slot {
    inner: Arc<Inner>,
}

impl ConnectionLimit {
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                free: Semaphore::new(limit),
                owed: AtomicUsize::new(0),
                limit: Mutex::new(limit),
            }),
        }
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> Option<Slot> {
        let permit = self.inner.free.try_acquire().ok()?;
        permit.forget();
        Some(self.slot())
    }

    /// A slot, once one is free.
    pub async fn acquire(&self) -> Slot {
        // The semaphore is never closed, so acquiring cannot fail.
        if let Ok(permit) = self.inner.free.acquire().await {
            permit.forget();
        }
        self.slot()
    }

    /// Makes the limit `limit`: at once for free slots, as connections
    /// close for the slots they hold.
    pub fn resize(&self, limit: usize) {
        let mut current = self
            .inner
            .limit
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if limit >= *current {
            let grow = limit - *current;
            // Slots still owed are simply no longer owed.
            let forgiven = self.inner.take_owed(grow);
            self.inner.free.add_permits(grow - forgiven);
        } else {
            let shrink = *current - limit;
            let taken = self.inner.free.forget_permits(shrink);
            self.inner.owed.fetch_add(shrink - taken, Ordering::AcqRel);
        }
        *current = limit;
    }

    fn slot(&self) -> Slot {
        Slot {
            inner: self.inner.clone(),
        }
    }
}

impl Inner {
    /// Takes up to `most` owed slots off the debt; how many it took.
    fn take_owed(&self, most: usize) -> usize {
        let mut owed = self.owed.load(Ordering::Acquire);
        loop {
            let take = owed.min(most);
            if take == 0 {
                return 0;
            }
            match self.owed.compare_exchange_weak(
                owed,
                owed - take,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return take,
                Err(now) => owed = now,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.inner.take_owed(1) == 0 {
            self.inner.free.add_permits(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(limit: &ConnectionLimit, n: usize) -> Vec<Slot> {
        (0..n)
            .map(|_| limit.try_acquire().expect("a free slot"))
            .collect()
    }

    #[test]
    fn growing_frees_slots_at_once() {
        let limit = ConnectionLimit::new(2);
        let _held = take(&limit, 2);
        assert!(limit.try_acquire().is_none());
        limit.resize(3);
        let _third = limit.try_acquire().expect("the slot added");
        assert!(limit.try_acquire().is_none());
    }

    #[test]
    fn shrinking_takes_free_slots_then_held_ones_as_they_come_back() {
        let limit = ConnectionLimit::new(4);
        let mut held = take(&limit, 3);
        limit.resize(1);
        assert!(limit.try_acquire().is_none(), "the free slot is gone");
        held.pop();
        assert!(limit.try_acquire().is_none(), "owed, not freed");
        held.pop();
        assert!(limit.try_acquire().is_none(), "one held: the limit of 1");
        held.pop();
        let one = limit.try_acquire().expect("the one slot");
        assert!(limit.try_acquire().is_none());
        drop(one);
        assert!(limit.try_acquire().is_some());
    }

    #[test]
    fn growing_again_forgives_what_is_still_owed() {
        let limit = ConnectionLimit::new(3);
        let held = take(&limit, 3);
        limit.resize(1);
        limit.resize(2);
        drop(held);
        let _two = take(&limit, 2);
        assert!(limit.try_acquire().is_none(), "the limit is 2");
    }

    #[tokio::test]
    async fn a_waiting_connection_gets_the_slot_a_closing_one_gives_back() {
        let limit = ConnectionLimit::new(1);
        let held = limit.try_acquire().expect("a free slot");
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(held);
        waiting.await.expect("the waiter got the slot");
    }
}
