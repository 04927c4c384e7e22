//! Writes that wait for the end of the event loop's turn, and go out
//! together in one system call.
//!
//! Under load a small proxied request costs mostly context switches, not
//! the gateway's own code. A write to a socket whose reader sleeps wakes the
//! reader (an instance, or a client), and the kernel lets the woken process
//! run at once on the writer's core: the worker is preempted on its way out
//! of `send`, before it has written the turn's other requests. The instance
//! then wakes for one request, the worker resumes for the next write, is
//! preempted again, and so on; on the reference machine 91% of a worker's
//! context switches happened on return from `send`, and a worker ran for
//! about one request between two of them (README, "Where the time goes").
//!
//! So the writes a worker makes during one turn (the requests to instances,
//! the responses to clients) wait until the tasks already queued have run,
//! and then go out together in one `io_uring_enter`: the processes they wake
//! run once the worker has written all of them, and each finds a batch of
//! work. A turn that has a single write sends it with a plain `send`.
//!
//! A worker that batches this way rarely sleeps, and two such workers that
//! the kernel has put on the same core take turns only at the scheduler's
//! tick (4 ms on the reference machine): every connection of the one left
//! waiting waits that long, which made most of the gateway's p99. So once a
//! batch has gone out the worker yields its core, once: two workers on one
//! core then take turns batch by batch, and a worker alone on its core goes
//! straight on (README, "Where the time goes").
//!
//! Batching is per worker thread and turned on by [`batch_writes`]. Where
//! io_uring cannot be used (not Linux, a kernel older than 5.6, a seccomp
//! filter that refuses it, `kernel.io_uring_disabled`), the writes still
//! wait for the end of the turn and then go out one `send` each.
//!
//! The batch owns what it sends, the stream and the bytes, until the kernel
//! is done with them: every send of a batch completes within the call that
//! flushes it (they are non-blocking: a full socket answers `EAGAIN`, and
//! its owner then waits for room the usual way). No buffer is ever lent to
//! the kernel past that call, whatever happens to the task that wrote it.

use std::io;
use std::task::Poll;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Writes all of `buf` to `stream` at the end of the turn, with the turn's
/// other writes; gives both back, with the outcome. A write that fails has
/// sent nothing, unless part of it went out before a later error.
pub async fn write_all(stream: TcpStream, buf: Vec<u8>) -> (TcpStream, Vec<u8>, io::Result<()>) {
    let queued = ring::enqueue(stream, buf);
    // Without batching too, so that the writes of a turn still go out
    // close together.
    end_of_turn().await;
    let (mut stream, buf, sent) = match queued {
        Ok(ticket) => ticket.take(),
        // Not batched here: nothing has been tried yet.
        Err((stream, buf)) => (stream, buf, Err(io::ErrorKind::WouldBlock.into())),
    };
    let result = match sent {
        Ok(n) if n == buf.len() => Ok(()),
        // The socket took part of it: the rest waits for room.
        Ok(n) => stream.write_all(&buf[n..]).await,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.write_all(&buf).await,
        Err(e) => Err(e),
    };
    (stream, buf, result)
}

/// Turns batched writes on for the current thread, if io_uring can be used
/// here; returns whether it is on. Each worker calls it once, on its own
/// thread.
pub fn batch_writes() -> bool {
    ring::enable()
}

/// Lets the tasks already queued on this worker run first, once: the
/// caller goes on at the end of the turn, before the worker polls its
/// sockets again. Not `tokio::task::yield_now`, which waits until after
/// that poll: every write would then also wait behind the next turn's work.
async fn end_of_turn() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod ring {
    //! The batch of one worker, and its io_uring.

    use std::cell::RefCell;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

    use io_uring::{IoUring, Probe, opcode, types};
    use tokio::net::TcpStream;

    /// Sends submitted per system call at most; a larger batch takes more.
    const RING_SIZE: u32 = 128;

    thread_local! {
        static BATCH: RefCell<Option<Shared>> = const { RefCell::new(None) };
    }

    /// The batch is reached from its worker's tasks only, but those tasks
    /// must be `Send`: a mutex, never contended, keeps that sound.
    type Shared = Arc<Mutex<Batch>>;

    pub fn enable() -> bool {
        if BATCH.with(|b| b.borrow().is_some()) {
            return true;
        }
        match Batch::new() {
            Ok(batch) => {
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
    pub fn enqueue(stream: TcpStream, buf: Vec<u8>) -> Result<Ticket, (TcpStream, Vec<u8>)> {
        let Some(shared) = BATCH.with(|b| b.borrow().clone()) else {
            return Err((stream, buf));
        };
        if buf.is_empty() {
            return Err((stream, buf));
        }
        let index = lock(&shared).add(stream, buf);
        Ok(Ticket {
            batch: shared,
            index,
            taken: false,
        })
    }

    /// `io_uring_enter` calls this thread's batch has made.
    #[cfg(test)]
    pub fn submissions() -> u64 {
        BATCH.with(|b| b.borrow().as_ref().map_or(0, |s| lock(s).submissions))
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
        pub fn take(mut self) -> (TcpStream, Vec<u8>, io::Result<usize>) {
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
            (slot.stream, slot.buf, sent)
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
        stream: TcpStream,
        buf: Vec<u8>,
        /// What the send did; `None` until the batch has gone out.
        sent: Option<io::Result<usize>>,
    }

    struct Batch {
        /// `None` once it failed: its writes then go out one `send` each.
        ring: Option<IoUring>,
        /// Writes by ticket index; `None` where a ticket index is free.
        slots: Vec<Option<Slot>>,
        free: Vec<usize>,
        /// Indexes of the writes not sent yet, in the order they came.
        waiting: Vec<usize>,
        /// `io_uring_enter` calls made so far.
        submissions: u64,
    }

    impl Batch {
        fn new() -> io::Result<Self> {
            let ring = IoUring::new(RING_SIZE)?;
            let mut probe = Probe::new();
            ring.submitter().register_probe(&mut probe)?;
            if !probe.is_supported(opcode::Send::CODE) {
                return Err(io::Error::other("this kernel's io_uring cannot send"));
            }
            Ok(Self {
                ring: Some(ring),
                slots: Vec::new(),
                free: Vec::new(),
                waiting: Vec::new(),
                submissions: 0,
            })
        }

        fn add(&mut self, stream: TcpStream, buf: Vec<u8>) -> usize {
            let slot = Some(Slot {
                stream,
                buf,
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
                for chunk in waiting.chunks(RING_SIZE as usize) {
                    self.send_together(chunk);
                }
            } else {
                for &index in &waiting {
                    self.send_alone(index);
                }
            }
            // Anything the ring did not take goes out the usual way.
            for &index in &waiting {
                if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) {
                    slot.sent
                        .get_or_insert_with(|| Err(io::ErrorKind::WouldBlock.into()));
                }
            }
            self.waiting = waiting;
            self.waiting.clear();
            together
        }

        /// A plain non-blocking `send`.
        fn send_alone(&mut self, index: usize) {
            if let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) {
                slot.sent = Some(slot.stream.try_write(&slot.buf));
            }
        }

        /// One `io_uring_enter` for the writes of `chunk` (more only if the
        /// kernel takes them in parts), returning once every one is done.
        fn send_together(&mut self, chunk: &[usize]) {
            let Some(ring) = self.ring.as_mut() else {
                return;
            };
            let mut left = 0;
            {
                let mut queue = ring.submission();
                for &index in chunk {
                    let Some(slot) = self.slots.get(index).and_then(Option::as_ref) else {
                        continue;
                    };
                    let len = u32::try_from(slot.buf.len()).unwrap_or(u32::MAX);
                    let send = opcode::Send::new(
                        types::Fd(slot.stream.as_raw_fd()),
                        slot.buf.as_ptr(),
                        len,
                    )
                    // Never wait for room: a full socket answers EAGAIN,
                    // so every send completes within this call.
                    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(index as u64);
                    // SAFETY: the bytes and the socket belong to the slot,
                    // which stays in place, untouched, until this function
                    // has reaped the send's completion below: nothing can
                    // take, drop or change a slot while `&mut self` is held.
                    if unsafe { queue.push(&send) }.is_err() {
                        // Full (it never is: it is empty between calls and
                        // a chunk is at most its size).
                        break;
                    }
                    left += 1;
                }
            }
            while left > 0 {
                self.submissions += 1;
                if let Err(e) = ring.submit_and_wait(left) {
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) {
                        self.abandon(chunk, e);
                        return;
                    }
                }
                for done in ring.completion() {
                    let result = done.result();
                    let outcome = if result >= 0 {
                        Ok(result as usize)
                    } else {
                        Err(io::Error::from_raw_os_error(-result))
                    };
                    if let Some(slot) = self
                        .slots
                        .get_mut(done.user_data() as usize)
                        .and_then(Option::as_mut)
                    {
                        slot.sent = Some(outcome);
                    }
                    left = left.saturating_sub(1);
                }
            }
        }

        /// The ring failed in a way it never should. The bytes of writes it
        /// may still hold are leaked, so the kernel can never read freed
        /// memory, and their owners get a copy and the error; this worker
        /// sends one write at a time from now on.
        fn abandon(&mut self, chunk: &[usize], error: io::Error) {
            tracing::error!(%error, "io_uring failed: writes go out one send each from now on");
            for &index in chunk {
                let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
                    continue;
                };
                if slot.sent.is_none() {
                    let copy = slot.buf.clone();
                    std::mem::forget(std::mem::replace(&mut slot.buf, copy));
                    slot.sent = Some(Err(io::Error::new(error.kind(), error.to_string())));
                }
            }
            std::mem::forget(self.ring.take());
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod ring {
    use tokio::net::TcpStream;

    pub fn enable() -> bool {
        false
    }

    pub enum Ticket {}

    impl Ticket {
        pub fn take(self) -> (TcpStream, Vec<u8>, std::io::Result<usize>) {
            match self {}
        }
    }

    pub fn enqueue(stream: TcpStream, buf: Vec<u8>) -> Result<Ticket, (TcpStream, Vec<u8>)> {
        Err((stream, buf))
    }

    #[cfg(test)]
    pub fn submissions() -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Waker};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// The two ends of a loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap());
        let (near, accepted) = tokio::join!(near, listener.accept());
        (near.unwrap(), accepted.unwrap().0)
    }

    /// Turns batching on for the test's thread; false (and a note) where
    /// io_uring cannot be used, as in some containers.
    fn batching() -> bool {
        let on = batch_writes();
        if !on {
            eprintln!("io_uring unavailable here: the batched path is not tested");
        }
        on
    }

    #[tokio::test]
    async fn the_writes_of_one_turn_go_out_in_one_system_call() {
        if !batching() {
            return;
        }
        let mut pairs = Vec::new();
        for _ in 0..16 {
            pairs.push(pair().await);
        }
        let before = ring::submissions();
        // Spawned together, the writers run in the same turn.
        let (writers, readers): (Vec<_>, Vec<_>) = (0..16u8)
            .zip(pairs)
            .map(|(i, (near, far))| {
                (
                    tokio::spawn(write_all(near, vec![i; 100 + i as usize])),
                    far,
                )
            })
            .unzip();
        for (i, (writer, mut reader)) in writers.into_iter().zip(readers).enumerate() {
            let (stream, buf, result) = writer.await.unwrap();
            result.unwrap();
            assert_eq!(buf, vec![i as u8; 100 + i], "the bytes come back");
            drop(stream);
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, buf);
        }
        assert_eq!(ring::submissions() - before, 1, "16 writes, one submission");
    }

    /// Reads exactly `len` bytes from `stream`.
    async fn read_len(mut stream: TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        stream.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn what_a_socket_does_not_take_goes_out_as_it_drains() {
        if !batching() {
            return;
        }
        // Two writes, so that they go through the ring; each larger than
        // loopback's socket buffers.
        let big: Vec<u8> = (0..32 << 20).map(|i: u32| i as u8).collect();
        let (a, a_reader) = pair().await;
        let (b, b_reader) = pair().await;
        let before = ring::submissions();
        let a = tokio::spawn(write_all(a, big.clone()));
        let b = tokio::spawn(write_all(b, big.clone()));
        let a_read = tokio::spawn(read_len(a_reader, big.len()));
        let b_read = tokio::spawn(read_len(b_reader, big.len()));
        for writer in [a, b] {
            let (_stream, _, result) = writer.await.unwrap();
            result.unwrap();
        }
        assert_eq!(ring::submissions() - before, 1, "sent through the ring");
        assert!(a_read.await.unwrap() == big);
        assert!(b_read.await.unwrap() == big);
    }

    #[test]
    fn a_full_socket_never_holds_up_the_others() {
        // If the ring waited for room on the full socket, the flush would
        // block this thread for good: its reader only starts after the
        // other write is through. A watchdog turns that into a failure.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if !batching() {
                    return;
                }
                let (full, full_reader) = pair().await;
                let (other, other_reader) = pair().await;
                // Fill `full` until the kernel takes no more.
                full.writable().await.unwrap();
                let chunk = vec![7u8; 1 << 16];
                let mut queued = 0;
                loop {
                    match full.try_write(&chunk) {
                        Ok(n) => queued += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                let before = ring::submissions();
                let late = tokio::spawn(write_all(full, b"late".to_vec()));
                let first = tokio::spawn(write_all(other, b"first".to_vec()));
                let (_other, _, result) = first.await.unwrap();
                result.unwrap();
                assert_eq!(read_len(other_reader, 5).await, b"first");
                assert_eq!(ring::submissions() - before, 1);
                // Now the full socket drains, and its write goes out.
                let drained = tokio::spawn(read_len(full_reader, queued + 4));
                let (_full, _, result) = late.await.unwrap();
                result.unwrap();
                assert!(drained.await.unwrap().ends_with(b"late"));
            });
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the batch went out without waiting for the full socket");
    }

    #[tokio::test]
    async fn a_write_whose_task_is_dropped_before_the_turn_ends_is_never_sent() {
        if !batching() {
            return;
        }
        let (dropped, mut dropped_reader) = pair().await;
        let (kept, mut kept_reader) = pair().await;
        let mut cx = Context::from_waker(Waker::noop());
        let mut cancelled = Box::pin(write_all(dropped, b"never".to_vec()));
        assert!(
            cancelled.as_mut().poll(&mut cx).is_pending(),
            "waits for the end of the turn"
        );
        drop(cancelled);
        let mut other = Box::pin(write_all(kept, b"sent".to_vec()));
        assert!(other.as_mut().poll(&mut cx).is_pending());
        let (kept, _, result) = other.await;
        result.unwrap();
        drop(kept);
        let mut got = Vec::new();
        kept_reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"sent");
        let mut got = Vec::new();
        dropped_reader.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "the dropped write's stream closed unsent");
    }

    #[tokio::test]
    async fn a_write_to_a_reset_connection_fails_and_the_others_go_out() {
        if !batching() {
            return;
        }
        let (reset, reset_peer) = pair().await;
        // Closing with a zero linger resets the connection at once.
        reset_peer.set_zero_linger().unwrap();
        drop(reset_peer);
        let (fine, mut fine_reader) = pair().await;
        let before = ring::submissions();
        let reset = tokio::spawn(write_all(reset, b"lost".to_vec()));
        let fine = tokio::spawn(write_all(fine, b"kept".to_vec()));
        let (_, buf, result) = reset.await.unwrap();
        assert!(result.is_err(), "{result:?}");
        assert_eq!(buf, b"lost", "the bytes come back with the error");
        let (fine, _, result) = fine.await.unwrap();
        result.unwrap();
        assert_eq!(ring::submissions() - before, 1);
        drop(fine);
        let mut got = Vec::new();
        fine_reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"kept");
    }

    #[test]
    fn without_batching_writes_go_out_one_by_one() {
        // A fresh thread, on which nothing turned batching on.
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (near, mut far) = pair().await;
                let (near, _, result) = write_all(near, b"hello".to_vec()).await;
                result.unwrap();
                drop(near);
                let mut got = Vec::new();
                far.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, b"hello");
                assert_eq!(ring::submissions(), 0, "no ring on this thread");
            });
        })
        .join()
        .unwrap();
    }

    #[tokio::test]
    async fn end_of_turn_lets_the_tasks_already_queued_run_first() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (order.clone(), order.clone());
        // Spawned, like the worker's connection tasks.
        let waiter = tokio::spawn(async move {
            a.lock().unwrap().push("waiter");
            end_of_turn().await;
            a.lock().unwrap().push("waiter goes on");
        });
        let queued = tokio::spawn(async move { b.lock().unwrap().push("queued") });
        waiter.await.unwrap();
        queued.await.unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            ["waiter", "queued", "waiter goes on"]
        );
    }
}
