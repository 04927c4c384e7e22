//! A large answer's body moved from the instance's socket to the client's
//! without passing through the gateway's memory: `splice(2)` through a
//! pipe, where the kernel hands pages on instead of copying them.
//!
//! Copying was a third of the gateway's CPU time on 256 KiB answers (the
//! kernel's copy into user memory on every read, and back on every write,
//! `perf`). An answer qualifies when its bytes go on unchanged: the
//! instance framed it with a `Content-Length` of at least [`SPLICE_MIN`]
//! and the client's HTTP/1 connection carries it with that same length.
//! Smaller answers are copied: a pipe costs two more system calls for each
//! piece, which only pays on large ones.
//!
//! The HTTP/1 writer lends the client's socket, with the answer's head
//! still to send, to the body ([`Handoff`]); the body writes the head,
//! then the part of itself read with the head, then splices the rest, and
//! every data frame it yields stands for bytes already delivered
//! ([`delivered`]). The frames keep their place in the stack: the access
//! log and the metrics count them, the idle timeouts see them come, and
//! the writer still checks the length against the head's. At the body's
//! end the writer takes the socket back for the next request.
//!
//! Where no pipe can be had (the open-files limit reached, say), the body
//! reads the rest of that answer as it reads any other and [`Splicer::hold`]s
//! it, to be written through the same lent socket: the answer is slower,
//! never broken off.

use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, Interest};
use tokio::net::TcpStream;

use crate::socket::Socket;

/// Bodies at least this large are spliced; smaller ones are copied.
pub const SPLICE_MIN: u64 = 64 * 1024;
/// The pipe between the two sockets holds this much: a piece of body
/// moves in two system calls however it arrived. No one delivery is
/// larger.
pub const PIPE_SIZE: usize = 256 * 1024;
/// The most one frame stands for.
pub const FRAME_MAX: usize = 1024 * 1024;
/// Empty pipes each worker keeps for the next answers.
const PIPES_KEPT: usize = 16;

/// What stand-in frames point into: their bytes are never read, only
/// counted, so this is never touched (and costs no memory).
static STAND_IN: [u8; FRAME_MAX] = [0; FRAME_MAX];

/// A data frame's bytes standing for `n` body bytes already delivered to
/// the client's socket. At most [`FRAME_MAX`].
pub fn delivered(n: usize) -> Bytes {
    Bytes::from_static(&STAND_IN[..n])
}

/// Whether `data` is a stand-in for bytes already delivered, not bytes
/// still to write.
pub fn is_delivered(data: &Bytes) -> bool {
    let start = STAND_IN.as_ptr() as usize;
    let at = data.as_ptr() as usize;
    !data.is_empty() && at >= start && at + data.len() <= start + FRAME_MAX
}

/// The client's socket, lent by the HTTP/1 writer to the body of the
/// answer it writes. The upstream body puts one in its response's
/// extensions when it can splice; the writer lends the socket if it sends
/// the body unchanged, and takes it back at the body's end.
#[derive(Clone, Debug, Default)]
pub struct Handoff(Arc<Mutex<Option<Lent>>>);

#[derive(Debug)]
struct Lent {
    socket: Socket,
    /// The answer's head (and what came with it), sent before the body.
    head: Vec<u8>,
    written: usize,
}

impl Handoff {
    /// Lends `socket`, with `head` to go out on it first.
    pub fn lend(&self, socket: Socket, head: Vec<u8>) {
        *self.lock() = Some(Lent {
            socket,
            head,
            written: 0,
        });
    }

    /// The socket back, with the head's buffer; `None` if it was never
    /// lent or is already back.
    pub fn take_back(&self) -> Option<(Socket, Vec<u8>)> {
        self.lock().take().map(|lent| (lent.socket, lent.head))
    }

    fn lock(&self) -> MutexGuard<'_, Option<Lent>> {
        // A panic while it was held leaves nothing half-done to see.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The body's side: moves what it has to the lent socket.
#[derive(Debug)]
pub struct Splicer {
    handoff: Handoff,
    /// Body bytes read with the head, not yet delivered.
    pending: Bytes,
    /// Bytes spliced from the instance, not yet to the client.
    pipe: Option<Pipe>,
    /// No pipe could be had: the rest is read and held instead.
    copying: bool,
}

impl Splicer {
    /// A splicer for a body of `length` bytes, and the hand-off to put in
    /// its response; `None` for a body too small to be worth it.
    pub fn for_length(length: u64) -> Option<(Self, Handoff)> {
        if length < SPLICE_MIN || !cfg!(target_os = "linux") {
            return None;
        }
        let handoff = Handoff::default();
        let splicer = Self {
            handoff: handoff.clone(),
            pending: Bytes::new(),
            pipe: None,
            copying: false,
        };
        Some((splicer, handoff))
    }

    /// Whether the writer has lent the socket.
    pub fn is_lent(&self) -> bool {
        self.handoff.lock().is_some()
    }

    /// Body bytes taken from the instance and not yet delivered.
    pub fn in_flight(&self) -> usize {
        self.pending.len() + self.pipe.as_ref().map_or(0, |pipe| pipe.held)
    }

    /// Body bytes read with the head, to deliver before any spliced.
    pub fn hold(&mut self, data: Bytes) {
        debug_assert!(self.pending.is_empty());
        self.pending = data;
    }

    /// Delivers what is in flight, the head first: ready with the body
    /// bytes delivered (0 once nothing is in flight), pending while the
    /// client's socket takes no more.
    pub fn poll_deliver(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut lent = self.handoff.lock();
        let lent = lent.as_mut().ok_or_else(not_lent)?;
        while lent.written < lent.head.len() {
            let n = ready!(Pin::new(&mut lent.socket).poll_write(cx, &lent.head[lent.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            lent.written += n;
        }
        if !self.pending.is_empty() {
            let piece = &self.pending[..self.pending.len().min(PIPE_SIZE)];
            let n = ready!(Pin::new(&mut lent.socket).poll_write(cx, piece))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
            return Poll::Ready(Ok(n));
        }
        let Some(pipe) = self.pipe.as_mut().filter(|pipe| pipe.held > 0) else {
            return Poll::Ready(Ok(0));
        };
        let n = ready!(lent.socket.poll_write_with(cx, |fd| pipe.drain_to(fd)))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        pipe.held -= n;
        if pipe.held == 0 {
            pipes::give(self.pipe.take().expect("checked above"));
        }
        Poll::Ready(Ok(n))
    }

    /// Whether the rest of the body can be spliced: a pipe is taken the
    /// first time. Without one to be had (the open-files limit reached),
    /// the caller reads the rest and [`hold`](Self::hold)s it.
    pub fn has_pipe(&mut self) -> bool {
        if self.pipe.is_none() && !self.copying {
            match pipes::take() {
                Ok(pipe) => self.pipe = Some(pipe),
                Err(e) => {
                    tracing::debug!(error = %e, "no pipe for a large answer: copying it");
                    self.copying = true;
                }
            }
        }
        self.pipe.is_some()
    }

    /// Splices up to `want` bytes from the instance's socket into the
    /// pipe ([`has_pipe`](Self::has_pipe) first), once nothing is in
    /// flight: ready with how many (0 when the instance closed the
    /// connection).
    pub fn poll_take(
        &mut self,
        from: &TcpStream,
        want: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        debug_assert_eq!(self.in_flight(), 0);
        let Some(pipe) = self.pipe.as_mut() else {
            return Poll::Ready(Err(io::Error::other("splicing without a pipe")));
        };
        let want = want.min(pipe.size.min(PIPE_SIZE));
        loop {
            ready!(from.poll_read_ready(cx))?;
            match from.try_io(Interest::READABLE, || pipe.fill_from(from, want)) {
                Ok(n) => {
                    pipe.held = n;
                    return Poll::Ready(Ok(n));
                }
                // The readiness was stale (and is cleared now): wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

fn not_lent() -> io::Error {
    io::Error::other("the client's socket is not lent to the body")
}

/// A pipe and how many bytes sit in it.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
    held: usize,
}

#[cfg(target_os = "linux")]
impl Pipe {
    fn new() -> io::Result<Self> {
        use rustix::pipe::{PipeFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with};
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Larger pipes move more per call; past the user's pipe allowance
        // (`/proc/sys/fs/pipe-user-pages-soft`) the kernel refuses, and the
        // pipe keeps the size it has.
        let size = fcntl_setpipe_size(&write, PIPE_SIZE).or_else(|_| fcntl_getpipe_size(&write))?;
        Ok(Self {
            read,
            write,
            size,
            held: 0,
        })
    }

    fn fill_from(&self, from: &TcpStream, want: usize) -> io::Result<usize> {
        use rustix::pipe::{SpliceFlags, splice};
        Ok(splice(
            from,
            None,
            &self.write,
            None,
            want,
            SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
        )?)
    }

    fn drain_to(&self, to: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
        use rustix::pipe::{SpliceFlags, splice};
        Ok(splice(
            &self.read,
            None,
            to,
            None,
            self.held,
            SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
        )?)
    }
}

/// Elsewhere no splicer is made ([`Splicer::for_length`]).
#[cfg(not(target_os = "linux"))]
impl Pipe {
    fn new() -> io::Result<Self> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn fill_from(&self, _: &TcpStream, _: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn drain_to(&self, _: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Each worker's empty pipes: making one costs two or three system calls
/// and closing it two more.
pub(crate) mod pipes {
    use std::cell::RefCell;
    use std::io;

    use super::{PIPES_KEPT, Pipe};

    thread_local! {
        static KEPT: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    /// What this thread's pipes are short of, for tests.
    #[cfg(test)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Scarce {
        Nothing,
        /// No pipe at all, as when the open-files limit is reached.
        Pipes,
        /// Pipes of one page, as when the pipe allowance is used up.
        Pages,
    }

    #[cfg(test)]
    thread_local! {
        static SCARCE: std::cell::Cell<Scarce> = const { std::cell::Cell::new(Scarce::Nothing) };
    }

    /// From now on this thread's pipes are short of `what`.
    #[cfg(test)]
    pub fn make_scarce(what: Scarce) {
        SCARCE.set(what);
    }

    /// How many empty pipes this thread keeps.
    #[cfg(test)]
    pub fn kept() -> usize {
        KEPT.with_borrow(Vec::len)
    }

    pub(super) fn take() -> io::Result<Pipe> {
        if let Some(pipe) = KEPT.with_borrow_mut(Vec::pop) {
            return Ok(pipe);
        }
        #[cfg(test)]
        match SCARCE.get() {
            Scarce::Nothing => {}
            Scarce::Pipes => return Err(io::Error::from_raw_os_error(24)), // EMFILE
            Scarce::Pages => {
                let mut pipe = Pipe::new()?;
                pipe.size = rustix::pipe::fcntl_setpipe_size(&pipe.write, 4096)?;
                return Ok(pipe);
            }
        }
        Pipe::new()
    }

    /// Keeps an empty pipe for the next answer; one with bytes left in it
    /// (an answer broken off) is closed.
    pub(super) fn give(pipe: Pipe) {
        if pipe.held == 0 {
            KEPT.with_borrow_mut(|kept| {
                if kept.len() < PIPES_KEPT {
                    kept.push(pipe);
                }
            });
        }
    }
}

impl Drop for Splicer {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            pipes::give(pipe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stand_ins_count_as_delivered() {
        let stand_in = delivered(FRAME_MAX);
        assert!(is_delivered(&stand_in));
        assert!(is_delivered(&stand_in.slice(1000..2000)));
        assert!(is_delivered(&delivered(1)));
        assert!(!is_delivered(&Bytes::new()), "no bytes stand for none");
        assert!(
            !is_delivered(&Bytes::from(vec![0u8; 4096])),
            "zeros to write are not a stand-in"
        );
        assert!(!is_delivered(&Bytes::from_static(b"body")));
    }

    #[test]
    fn small_bodies_are_not_spliced() {
        assert!(Splicer::for_length(SPLICE_MIN - 1).is_none());
        assert_eq!(
            Splicer::for_length(SPLICE_MIN).is_some(),
            cfg!(target_os = "linux")
        );
    }
}
