//! The io_uring that sends a batch of writes in one system call: with one
//! socket option in `server::defer`, the only place in the crate that
//! uses `unsafe`.
//!
//! SAFETY, the whole argument. A submission names a socket (by file
//! descriptor) and a buffer (by address and length), and the kernel reads
//! the buffer some time between `io_uring_enter` and the completion it
//! posts. So every buffer must stay where it is, unchanged and not freed,
//! until its completion is reaped. [`Ring::send_all`] ensures it on its
//! own, whatever its caller does:
//!
//! 1. The buffers are the `Vec`s of the `writes` slice, which the call
//!    borrows mutably for its whole duration: nothing else can move, change
//!    or free them meanwhile, and a `Vec`'s bytes do not move while the
//!    `Vec` is not touched.
//! 2. Every send is non-blocking (`MSG_DONTWAIT`): a full socket answers
//!    `EAGAIN` at once instead of waiting for room, so every submission
//!    completes promptly, and the call waits for all of them before it
//!    returns.
//! 3. If the ring fails in a way that leaves submissions possibly in
//!    flight (an error from `io_uring_enter` other than an interruption),
//!    the buffers of the writes without a completion are leaked (replaced
//!    by copies), and so is the ring itself: the kernel can never read
//!    freed memory, and the ring is never used again.
//! 4. The submission queue is empty between calls (everything pushed is
//!    submitted and reaped within one call), so a completion's `user_data`
//!    always names a write of the current call.
//!
//! A file descriptor that is closed while its send is in flight is no
//! danger to memory: the kernel holds its own reference to the socket from
//! submission on. The callers own the sockets for the whole call anyway.

use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, Probe, opcode, types};

/// Sends submitted per system call at most; a larger batch takes more calls.
pub const RING_SIZE: usize = 128;

/// One write of a batch: the socket, the bytes, and what the send did
/// (`None` until it is done).
pub struct Outgoing {
    pub fd: RawFd,
    pub buf: Vec<u8>,
    pub sent: Option<io::Result<usize>>,
}

pub struct Ring {
    ring: IoUring,
    /// `io_uring_enter` calls made so far.
    pub submissions: u64,
}

impl Ring {
    /// A ring, if this kernel has io_uring and lets it send.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(RING_SIZE as u32)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Send::CODE) {
            return Err(io::Error::other("this kernel's io_uring cannot send"));
        }
        Ok(Self {
            ring,
            submissions: 0,
        })
    }

    /// Sends every write of `writes` (at most [`RING_SIZE`]), each with
    /// its outcome in `sent` when this returns. `Err`: the ring failed and
    /// is consumed (leaked, see the module's documentation); the writes it
    /// could not send carry the error.
    pub fn send_all(mut self: Box<Self>, writes: &mut [Outgoing]) -> Result<Box<Self>, ()> {
        let count = writes.len().min(RING_SIZE);
        let writes = &mut writes[..count];
        let mut left = 0;
        {
            let mut queue = self.ring.submission();
            for (index, write) in writes.iter().enumerate() {
                let len = u32::try_from(write.buf.len()).unwrap_or(u32::MAX);
                let send = opcode::Send::new(types::Fd(write.fd), write.buf.as_ptr(), len)
                    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(index as u64);
                // SAFETY: points 1 and 4 of the module's documentation.
                if unsafe { queue.push(&send) }.is_err() {
                    // Full: never, as the queue is empty here and holds RING_SIZE.
                    break;
                }
                left += 1;
            }
        }
        while left > 0 {
            self.submissions += 1;
            if let Err(e) = self.ring.submit_and_wait(left)
                && !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                )
            {
                abandon(self, writes, e);
                return Err(());
            }
            for done in self.ring.completion() {
                let result = done.result();
                let outcome = if result >= 0 {
                    Ok(result as usize)
                } else {
                    Err(io::Error::from_raw_os_error(-result))
                };
                if let Some(write) = writes.get_mut(done.user_data() as usize) {
                    write.sent = Some(outcome);
                }
                left = left.saturating_sub(1);
            }
        }
        Ok(self)
    }
}

/// Point 3 of the module's documentation: the ring failed in a way it
/// never should. The bytes of writes it may still hold are leaked, and
/// their owners get a copy and the error.
fn abandon(ring: Box<Ring>, writes: &mut [Outgoing], error: io::Error) {
    tracing::error!(%error, "io_uring failed: writes go out one send each from now on");
    for write in writes.iter_mut().filter(|w| w.sent.is_none()) {
        let copy = write.buf.clone();
        std::mem::forget(std::mem::replace(&mut write.buf, copy));
        write.sent = Some(Err(io::Error::new(error.kind(), error.to_string())));
    }
    std::mem::forget(ring);
}
