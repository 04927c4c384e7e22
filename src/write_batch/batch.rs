//! The batch of one worker: the writes waiting for the end of the turn,
//! and the tickets their writers hold.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::pieces::MAX_SLICES;
use super::ring::{Outgoing, RING_SIZE, Ring};
use super::{Gathered, Then, shut_down};
use crate::socket::Socket;

thread_local! {
    static BATCH: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

/// The batch is reached from its worker's tasks only, but those tasks
/// must be `Send`: a mutex, never contended, keeps that sound.
type Shared = Arc<Mutex<Batch>>;

/// Turns batching on for this thread if a ring can be made.
pub fn enable() -> bool {
    if BATCH.with(|b| b.borrow().is_some()) {
        return true;
    }
    match Ring::new() {
        Ok(ring) => {
            let batch = Batch {
                ring: Some(Box::new(ring)),
                slots: Vec::new(),
                free: Vec::new(),
                waiting: Vec::new(),
                outgoing: Vec::new(),
            };
            BATCH.with(|b| *b.borrow_mut() = Some(Arc::new(Mutex::new(batch))));
            true
        }
        Err(e) => {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::info!(error = %e, "io_uring unavailable: each write is a system call of its own");
            });
            false
        }
    }
}

/// Adds a write to this thread's batch; gives the stream and bytes back
/// when batching is off here or there is nothing to send.
pub fn enqueue(stream: Socket, write: Gathered, then: Then) -> Result<Ticket, (Socket, Gathered)> {
    let Some(shared) = BATCH.with(|b| b.borrow().clone()) else {
        return Err((stream, write));
    };
    if write.is_empty() {
        return Err((stream, write));
    }
    let index = lock(&shared).add(stream, write, then);
    Ok(Ticket {
        batch: shared,
        index,
        taken: false,
    })
}

/// `io_uring_enter` calls this thread's batch has made.
#[cfg(test)]
pub fn submissions() -> u64 {
    BATCH.with(|b| {
        b.borrow()
            .as_ref()
            .and_then(|s| lock(s).ring.as_ref().map(|r| r.submissions))
            .unwrap_or(0)
    })
}

fn lock(shared: &Shared) -> MutexGuard<'_, Batch> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One write waiting in a batch. Dropped before it is taken (its task
/// was cancelled), it takes the write out of the batch, unsent if the
/// batch has not gone out yet.
pub struct Ticket {
    batch: Shared,
    index: usize,
    taken: bool,
}

impl Ticket {
    /// The stream, the bytes and what the send did, flushing the batch
    /// first if it has not gone out yet.
    pub fn take(mut self) -> (Socket, Gathered, io::Result<usize>) {
        let (slot, sent_together) = lock(&self.batch)
            .take(self.index)
            .expect("a ticket's write stays in the batch until the ticket takes it");
        self.taken = true;
        if sent_together {
            // Another worker on this core runs now, not at the next
            // tick (see the module's documentation).
            std::thread::yield_now();
        }
        // Every write has its outcome once its batch went out.
        let sent = slot.sent.unwrap_or(Err(io::ErrorKind::WouldBlock.into()));
        (slot.stream, slot.write, sent)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.taken {
            lock(&self.batch).remove(self.index);
        }
    }
}

struct Slot {
    stream: Socket,
    write: Gathered,
    then: Then,
    /// What the send did; `None` until the batch has gone out.
    sent: Option<io::Result<usize>>,
}

struct Batch {
    /// `None` once it failed: its writes then go out one `send` each.
    ring: Option<Box<Ring>>,
    /// Writes by ticket index; `None` where a ticket index is free.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Indexes of the writes not sent yet, in the order they came.
    waiting: Vec<usize>,
    /// The writes handed to the ring, kept to reuse its allocation.
    outgoing: Vec<Outgoing>,
}

impl Batch {
    fn add(&mut self, stream: Socket, write: Gathered, then: Then) -> usize {
        let slot = Some(Slot {
            stream,
            write,
            then,
            sent: None,
        });
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index] = slot;
                index
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.waiting.push(index);
        index
    }

    /// The write at `index`, sent: the batch goes out first if it
    /// has not yet, and then whether it went out through the ring.
    fn take(&mut self, index: usize) -> Option<(Slot, bool)> {
        let slot = self.slots.get_mut(index)?;
        let mut sent_together = false;
        if slot.as_ref().is_some_and(|s| s.sent.is_none()) {
            sent_together = self.flush();
        }
        let slot = self.slots[index].take()?;
        self.free.push(index);
        Some((slot, sent_together))
    }

    fn remove(&mut self, index: usize) {
        if let Some(slot) = self.slots.get_mut(index).and_then(Option::take) {
            if slot.sent.is_none() {
                self.waiting.retain(|&i| i != index);
            }
            self.free.push(index);
        }
    }

    /// Sends every waiting write; each gets its outcome. Returns
    /// whether they went out through the ring.
    fn flush(&mut self) -> bool {
        let waiting = std::mem::take(&mut self.waiting);
        let together = waiting.len() > 1 && self.ring.is_some();
        if together {
            for chunk in waiting.chunks(RING_SIZE) {
                self.send_together(chunk);
            }
        } else {
            for &index in &waiting {
                if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) {
                    slot.sent = Some(try_write(&slot.stream, &slot.write));
                }
            }
        }
        for &index in &waiting {
            if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) {
                // Anything the ring did not take goes out the usual way.
                let sent = slot
                    .sent
                    .get_or_insert_with(|| Err(io::ErrorKind::WouldBlock.into()));
                // A last write all out: its end goes right behind it, before
                // its peer can have read it (see `Then::Shutdown`).
                if slot.then == Then::Shutdown
                    && sent.as_ref().is_ok_and(|&n| n == slot.write.len())
                {
                    shut_down(&slot.stream);
                }
            }
        }
        self.waiting = waiting;
        self.waiting.clear();
        together
    }

    /// The writes of `chunk` through the ring, their bytes lent to it for
    /// the call and put back with their outcomes.
    fn send_together(&mut self, chunk: &[usize]) {
        let Some(ring) = self.ring.take() else {
            return;
        };
        let mut outgoing = std::mem::take(&mut self.outgoing);
        for &index in chunk {
            if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) {
                outgoing.push(Outgoing {
                    fd: slot.stream.as_raw_fd(),
                    write: std::mem::take(&mut slot.write),
                    sent: None,
                });
            }
        }
        self.ring = ring.send_all(&mut outgoing).ok();
        let mut done = outgoing.drain(..);
        for &index in chunk {
            if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut)
                && let Some(write) = done.next()
            {
                slot.write = write.write;
                slot.sent = write.sent;
            }
        }
        drop(done);
        self.outgoing = outgoing;
    }
}

/// One non-blocking send of `write`, vectored if it has pieces.
fn try_write(stream: &Socket, write: &Gathered) -> io::Result<usize> {
    if write.pieces.is_empty() {
        return stream.try_write(&write.buf);
    }
    let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
    let count = write.pieces.slices(&write.buf, &mut slices);
    stream.try_write_vectored(&slices[..count])
}
