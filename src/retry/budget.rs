//! The per-service retry budget.
//!
//! Why a budget and not only `max_attempts`: when a whole service is failing,
//! "3 attempts per request" triples the load on it exactly when it can least
//! take it. A budget caps retries as a share of the traffic instead: retries
//! may add at most `ratio` to the request rate, plus `min_per_sec` so that a
//! quiet service can still retry at all, measured over a sliding 10 s window.
//! These are the semantics of tower's `TpsBudget` (and Finagle's, which it
//! follows). Ours keeps the ratio in thousandths, so any ratio behaves as
//! written (tower#857 truncates `1/ratio` to an integer).
//!
//! The window is ten one-second slots. Each request deposits into the current
//! slot, each retry withdraws from it; the balance is the sum over the window
//! plus the fixed reserve. Slots are atomics; only moving the window on to a
//! new second takes a lock, and `try_lock`, so no request ever waits on it.
//!
//! A reload changes the ratio and the reserve in place ([`RetryBudget::set`]):
//! what the window holds stays, so a reload neither hands out a fresh
//! budget nor takes away what traffic has earned.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const SLOTS: usize = 10;
const SLOT: Duration = Duration::from_secs(1);
/// The budget's window: `SLOTS × SLOT`.
pub const WINDOW: Duration = Duration::from_secs(SLOTS as u64);
/// One retry costs this much; one request deposits `ratio × COST`.
const COST: i64 = 1000;

#[derive(Debug)]
pub struct RetryBudget {
    deposit: AtomicI64,
    reserve: AtomicI64,
    slots: [AtomicI64; SLOTS],
    /// Index of the current slot, as whole slots since `epoch`.
    current: AtomicU64,
    epoch: Instant,
    rotating: Mutex<()>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_sec: u32) -> Self {
        Self {
            deposit: AtomicI64::new(deposit_of(ratio)),
            reserve: AtomicI64::new(reserve_of(min_per_sec)),
            slots: Default::default(),
            current: AtomicU64::new(0),
            epoch: Instant::now(),
            rotating: Mutex::new(()),
        }
    }

    /// From now on, each request deposits `ratio` of a retry and the
    /// reserve is `min_per_sec` over the window; what the window holds stays.
    pub fn set(&self, ratio: f64, min_per_sec: u32) {
        self.deposit.store(deposit_of(ratio), Ordering::Relaxed);
        self.reserve
            .store(reserve_of(min_per_sec), Ordering::Relaxed);
    }

    /// Records one request (not a retry) into the budget.
    pub fn deposit(&self) {
        let slot = self.slot();
        let deposit = self.deposit.load(Ordering::Relaxed);
        self.slots[slot].fetch_add(deposit, Ordering::Relaxed);
    }

    /// Takes one retry out of the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let slot = self.slot();
        let balance: i64 = self.slots.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        if balance + self.reserve.load(Ordering::Relaxed) < COST {
            return false;
        }
        self.slots[slot].fetch_sub(COST, Ordering::Relaxed);
        true
    }

    /// Retries the budget allows right now (for tests and diagnostics).
    pub fn available(&self) -> i64 {
        self.slot();
        let balance: i64 = self.slots.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        (balance + self.reserve.load(Ordering::Relaxed)).max(0) / COST
    }

    /// The current slot's index in `slots`, after clearing the slots the
    /// window has moved past since the last call.
    fn slot(&self) -> usize {
        let now = (Instant::now() - self.epoch).as_nanos() / SLOT.as_nanos();
        let now = now as u64;
        let current = self.current.load(Ordering::Acquire);
        if now > current {
            // One caller moves the window; the others use the old slot for
            // this one call, which only shifts a deposit by a second.
            if let Ok(_guard) = self.rotating.try_lock() {
                let current = self.current.load(Ordering::Acquire);
                if now <= current {
                    // Another caller moved the window meanwhile.
                    return (current % SLOTS as u64) as usize;
                }
                let stale = (now - current).min(SLOTS as u64);
                for step in 1..=stale {
                    self.slots[((current + step) % SLOTS as u64) as usize]
                        .store(0, Ordering::Relaxed);
                }
                self.current.store(now, Ordering::Release);
                return (now % SLOTS as u64) as usize;
            }
        }
        (current % SLOTS as u64) as usize
    }
}

fn deposit_of(ratio: f64) -> i64 {
    (ratio * COST as f64).round() as i64
}

fn reserve_of(min_per_sec: u32) -> i64 {
    i64::from(min_per_sec) * WINDOW.as_secs() as i64 * COST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reserve_allows_min_per_sec_over_the_window_without_traffic() {
        let budget = RetryBudget::new(0.2, 10);
        let mut allowed = 0;
        while budget.withdraw() {
            allowed += 1;
            assert!(allowed <= 1000, "unbounded");
        }
        assert_eq!(allowed, 100, "10/s over 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_adds_a_share_of_requests() {
        let budget = RetryBudget::new(0.2, 0);
        assert!(!budget.withdraw());
        for _ in 0..100 {
            budget.deposit();
        }
        let mut allowed = 0;
        while budget.withdraw() {
            allowed += 1;
        }
        assert_eq!(allowed, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn ratios_without_an_integer_reciprocal_behave_as_written() {
        let budget = RetryBudget::new(0.3, 0);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_window() {
        let budget = RetryBudget::new(0.5, 0);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 5);
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 10);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            budget.available(),
            5,
            "the first second's deposits left the window"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn spent_withdrawals_recover_as_the_window_moves() {
        let budget = RetryBudget::new(0.0, 1);
        while budget.withdraw() {}
        assert_eq!(budget.available(), 0);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(budget.available(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_ratio_applies_to_later_deposits_and_keeps_the_window() {
        let budget = RetryBudget::new(0.1, 0);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 10);
        budget.set(0.5, 0);
        assert_eq!(budget.available(), 10, "what the window holds stays");
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 60);
        budget.set(0.5, 2);
        assert_eq!(budget.available(), 80, "the reserve is 2/s over 10 s");
    }
}
