//! A TCP connection that joins the event loop only once it has to wait.
//!
//! Registering a socket with the event loop costs two `epoll_ctl` calls
//! (one to add it, one to remove it before it closes) and the runtime's
//! bookkeeping for it. A client that opens a connection per request needs
//! neither: its request is already there when the connection is accepted
//! (`TCP_DEFER_ACCEPT`, see `server::defer`), its answer fits in the
//! socket's buffer, and the connection closes after it. So an accepted
//! connection starts [bare](Socket::bare): reads and writes are plain
//! non-blocking calls, and only the first one that would block registers
//! the socket, for good, and waits the usual way. A connection that stays
//! open (keep-alive) is registered when it first waits for its next
//! request, as before; one that never waits is never registered.
//!
//! On a bare socket, a read goes through the worker's own scratch buffer
//! of [`BARE_READ`] bytes and what it got is copied out: the standard
//! library reads only into initialised memory, and zeroing the caller's
//! buffer first (8 KiB for a request head) cost more than copying the
//! few hundred bytes a request head is. A read that fills the scratch
//! buffer registers the socket: more is coming (an upload), and it reads
//! better straight into the caller's buffer.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The most a read on a bare socket takes.
pub const BARE_READ: usize = 16 * 1024;

thread_local! {
    /// Where a bare socket's reads land first, zeroed once per thread.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; BARE_READ].into_boxed_slice());
}

/// A connected TCP socket, registered with the event loop or not yet.
#[derive(Debug)]
pub struct Socket(State);

#[derive(Debug)]
enum State {
    /// Not registered: every call is a plain non-blocking one.
    Bare(std::net::TcpStream),
    Registered(TcpStream),
    /// Registering failed: the socket is closed, every call fails.
    Broken,
}

impl Socket {
    /// A socket not registered yet. It must be in non-blocking mode.
    pub fn bare(stream: std::net::TcpStream) -> Self {
        Self(State::Bare(stream))
    }

    /// Whether it has joined the event loop.
    pub fn is_registered(&self) -> bool {
        matches!(self.0, State::Registered(_))
    }

    /// The registered stream, registering it first if it is not yet.
    pub fn into_registered(self) -> io::Result<TcpStream> {
        match self.0 {
            State::Registered(stream) => Ok(stream),
            State::Bare(stream) => TcpStream::from_std(stream),
            State::Broken => Err(broken()),
        }
    }

    /// The registered stream, registering it now if it is not yet.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let State::Bare(_) = self.0 {
            let State::Bare(stream) = std::mem::replace(&mut self.0, State::Broken) else {
                return Err(broken());
            };
            self.0 = State::Registered(TcpStream::from_std(stream)?);
        }
        match &mut self.0 {
            State::Registered(stream) => Ok(stream),
            _ => Err(broken()),
        }
    }

    /// One non-blocking write of `bufs`, whether registered or not.
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &self.0 {
            State::Bare(stream) => retry_interrupted(|| (&*stream).write_vectored(bufs)),
            State::Registered(stream) => stream.try_write_vectored(bufs),
            State::Broken => Err(broken()),
        }
    }

    /// The socket's descriptor, unless registering it failed.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.0 {
            State::Bare(stream) => Some(stream.as_fd()),
            State::Registered(stream) => Some(stream.as_fd()),
            State::Broken => None,
        }
    }

    /// One non-blocking write of `buf`, whether registered or not.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            State::Bare(stream) => retry_interrupted(|| (&*stream).write(buf)),
            State::Registered(stream) => stream.try_write(buf),
            State::Broken => Err(broken()),
        }
    }
}

impl Socket {
    /// Runs `write`, a non-blocking write-like call on the descriptor (a
    /// `splice` to it, say), until it does not block: a bare socket tries
    /// it as it is and registers only if it would block.
    pub fn poll_write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(BorrowedFd<'_>) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        if let State::Bare(stream) = &self.0
            && let Some(done) = bare(retry_interrupted(|| write(stream.as_fd())))
        {
            return Poll::Ready(done);
        }
        let stream = self.registered()?;
        loop {
            std::task::ready!(stream.poll_write_ready(cx))?;
            match stream.try_io(tokio::io::Interest::WRITABLE, || write(stream.as_fd())) {
                // The readiness was stale (and is cleared now): wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

impl From<TcpStream> for Socket {
    fn from(stream: TcpStream) -> Self {
        Self(State::Registered(stream))
    }
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the socket could not join the event loop",
    )
}

fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// What a call on a bare socket did: done, or it would block (and the
/// socket must be registered to wait).
fn bare<T>(result: io::Result<T>) -> Option<io::Result<T>> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        result => Some(result),
    }
}

/// A socket whose registering failed has no descriptor: -1, which no
/// system call takes for a socket (the ring's send then fails `EBADF`).
impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd().map_or(-1, |fd| fd.as_raw_fd())
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Bare(stream) = &this.0 {
            let read = SCRATCH.with_borrow_mut(|scratch| {
                let room = buf.remaining().min(scratch.len());
                let n = retry_interrupted(|| (&*stream).read(&mut scratch[..room]))?;
                buf.put_slice(&scratch[..n]);
                Ok(n)
            });
            if let Some(read) = bare(read) {
                // A read that filled the scratch buffer: more is coming (an
                // upload), which reads better registered, straight into
                // the caller's buffer and in its size.
                if matches!(read, Ok(BARE_READ))
                    && let Err(e) = this.registered()
                {
                    tracing::debug!(error = %e, "a connection could not join the event loop");
                }
                return Poll::Ready(read.map(|_| ()));
            }
        }
        Pin::new(this.registered()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    /// One buffer is a vectored write of one slice: a single path for
    /// both, bare or registered.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Bare(_) = this.0
            && let Some(written) = bare(this.try_write_vectored(bufs))
        {
            return Poll::Ready(written);
        }
        Pin::new(this.registered()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            State::Bare(stream) => Poll::Ready(stream.shutdown(std::net::Shutdown::Write)),
            State::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Broken => Poll::Ready(Err(broken())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A bare socket and its peer, over loopback.
    async fn pair() -> (Socket, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        (Socket::bare(accepted), peer)
    }

    /// Waits until `socket` has bytes to read, through a registered
    /// duplicate of it, so that a bare read finds them.
    async fn until_readable(socket: &Socket) {
        let probe = TcpStream::from_std(std::net::TcpStream::from(
            socket.fd().unwrap().try_clone_to_owned().unwrap(),
        ))
        .unwrap();
        probe.readable().await.unwrap();
    }

    #[tokio::test]
    async fn what_is_there_is_read_and_answered_without_registering() {
        let (mut socket, mut peer) = pair().await;
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        until_readable(&socket).await;
        let mut buf = bytes::BytesMut::with_capacity(64);
        socket.read_buf(&mut buf).await.unwrap();
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n\r\n");
        socket.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        socket.shutdown().await.unwrap();
        assert!(!socket.is_registered(), "nothing had to wait");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\n\r\n");
    }

    #[tokio::test]
    async fn more_than_a_bare_read_takes_arrives_whole_and_in_order() {
        let (mut socket, mut peer) = pair().await;
        let sent: Vec<u8> = (0..BARE_READ as u32 * 5 / 2)
            .map(|i| (i % 251) as u8)
            .collect();
        peer.write_all(&sent).await.unwrap();
        peer.shutdown().await.unwrap();
        until_readable(&socket).await;
        // Reads into a buffer smaller than the scratch one, then larger.
        let mut head = [0u8; 100];
        socket.read_exact(&mut head).await.unwrap();
        assert!(!socket.is_registered());
        let mut rest = Vec::new();
        socket.read_to_end(&mut rest).await.unwrap();
        assert_eq!(head[..], sent[..100]);
        assert!(rest[..] == sent[100..]);
        assert!(
            socket.is_registered(),
            "a read that filled the scratch buffer registered the socket"
        );
    }

    #[tokio::test]
    async fn a_read_that_would_block_registers_and_waits() {
        let (mut socket, mut peer) = pair().await;
        let mut buf = [0u8; 5];
        {
            let mut read = std::pin::pin!(socket.read_exact(&mut buf));
            // Nothing sent yet: the read registers the socket and waits.
            let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
            assert!(first.is_pending());
            peer.write_all(b"hello").await.unwrap();
            read.await.unwrap();
        }
        assert_eq!(&buf, b"hello");
        assert!(socket.is_registered());
    }

    #[tokio::test]
    async fn a_write_that_would_block_registers_and_waits_for_room() {
        let (mut socket, mut peer) = pair().await;
        let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 249) as u8).collect();
        let expected = big.clone();
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        socket.write_all(&big).await.unwrap();
        assert!(
            socket.is_registered(),
            "8 MiB do not fit in a socket's buffer"
        );
        socket.shutdown().await.unwrap();
        assert!(reading.await.unwrap() == expected);
    }
}
