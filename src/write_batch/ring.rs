//! The io_uring that sends a batch of writes in one system call: with one
//! socket option in `server::defer` and the listening socket's
//! registration in `server::listener`, the only place in the crate that
//! uses `unsafe`.
//!
//! SAFETY, the whole argument. A submission names a socket (by file
//! descriptor) and a buffer (by address and length), and the kernel reads
//! the buffer some time between `io_uring_enter` and the completion it
//! posts. So every buffer must stay where it is, unchanged and not freed,
//! until its completion is reaped. [`Ring::send_all`] ensures it on its
//! own, whatever its caller does:
//!
//! 1. The buffers are the `Vec`s and the pieces' `Bytes` of the `writes`
//!    slice, which the call borrows mutably for its whole duration: nothing
//!    else can move, change or free them meanwhile. A `Vec`'s bytes do not
//!    move while the `Vec` is not touched, and a `Bytes`' bytes neither
//!    move nor change while it lives. A vectored write also names its
//!    slices (`iovec`s) and their header (`msghdr`): they are the call's
//!    own locals, all built before the first submission and not touched
//!    again until the call returns, so they do not move either.
//! 2. Every send is non-blocking (`MSG_DONTWAIT`): a full socket answers
//!    `EAGAIN` at once instead of waiting for room, so every submission
//!    completes promptly, and the call waits for all of them before it
//!    returns.
//! 3. If the ring fails in a way that leaves submissions possibly in
//!    flight (an error from `io_uring_enter` other than an interruption),
//!    the buffers of the writes without a completion are leaked (replaced
//!    by copies), and so are the slices, the headers and the ring itself:
//!    the kernel can never read freed memory, and the ring is never used
//!    again.
//! 4. The submission queue is empty between calls (everything pushed is
//!    submitted and reaped within one call), so a completion's `user_data`
//!    always names a write of the current call.
//!
//! A file descriptor that is closed while its send is in flight is no
//! danger to memory: the kernel holds its own reference to the socket from
//! submission on. The callers own the sockets for the whole call anyway.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;

use io_uring::{IoUring, Probe, opcode, types};

use super::Gathered;
use super::pieces::MAX_SLICES;

/// Sends submitted per system call at most; a larger batch takes more calls.
pub const RING_SIZE: usize = 128;

/// One write of a batch: the socket, the bytes, and what the send did
/// (`None` until it is done).
pub struct Outgoing {
    pub fd: RawFd,
    pub write: Gathered,
    pub sent: Option<io::Result<usize>>,
}

const FLAGS: i32 = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;

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
        if !probe.is_supported(opcode::Send::CODE) || !probe.is_supported(opcode::SendMsg::CODE) {
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
        // The vectored writes' slices, then their headers, each pointing
        // into the other only once it is complete (point 1).
        let vectored = writes.iter().filter(|w| !w.write.pieces.is_empty());
        let how_many = vectored.clone().count();
        let mut iovecs = Vec::with_capacity(how_many * MAX_SLICES);
        let mut spans = Vec::with_capacity(how_many);
        for write in vectored {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = write.write.pieces.slices(&write.write.buf, &mut slices);
            spans.push((iovecs.len(), count));
            iovecs.extend(slices[..count].iter().map(|slice| libc::iovec {
                iov_base: slice.as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            }));
        }
        let headers: Vec<libc::msghdr> = spans
            .iter()
            .map(|&(start, count)| {
                // SAFETY: a `msghdr` is plain data, for which all zeroes
                // (no name, no control data, no flags) is a valid value.
                let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
                // SAFETY: `start` is within `iovecs`, which is complete.
                header.msg_iov = unsafe { iovecs.as_mut_ptr().add(start) };
                header.msg_iovlen = count as _;
                header
            })
            .collect();
        let mut left = 0;
        {
            let mut queue = self.ring.submission();
            let mut next_header = 0;
            for (index, write) in writes.iter().enumerate() {
                let fd = types::Fd(write.fd);
                let send = if write.write.pieces.is_empty() {
                    let buf = &write.write.buf;
                    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                    opcode::Send::new(fd, buf.as_ptr(), len)
                        .flags(FLAGS)
                        .build()
                } else {
                    let header = &headers[next_header];
                    next_header += 1;
                    opcode::SendMsg::new(fd, header).flags(FLAGS as u32).build()
                };
                let send = send.user_data(index as u64);
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
                std::mem::forget((iovecs, headers));
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
        let copy = write.write.buf.clone();
        std::mem::forget(std::mem::replace(&mut write.write.buf, copy));
        // Each piece's bytes outlive every owner: one more is forgotten.
        write
            .write
            .pieces
            .iter()
            .for_each(|piece| std::mem::forget(piece.clone()));
        write.sent = Some(Err(io::Error::new(error.kind(), error.to_string())));
    }
    std::mem::forget(ring);
}
