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
use std::time::Duration;

use crate::socket::Socket;

pub use pieces::{PIECE_MIN, Pieces, write_now};

/// The bytes of one write: a buffer, and large pieces placed in it
/// without being copied ([`Pieces`]).
#[derive(Default)]
pub struct Gathered {
    pub buf: Vec<u8>,
    pub pieces: Pieces,
}

impl Gathered {
    /// A write of `buf` alone.
    pub fn of(buf: Vec<u8>) -> Self {
        Self {
            buf,
            pieces: Pieces::new(),
        }
    }

    /// How many bytes it sends.
    pub fn len(&self) -> usize {
        self.buf.len() + self.pieces.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What becomes of a stream's sending side once a write is all out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// More may be written.
    More,
    /// Nothing more will be: the sending side is shut down (`FIN`) right
    /// behind the last byte, in the same moment as the turn's writes go
    /// out, not when the stream is closed later. The peer then sees the
    /// answer and its end together; on a connection the gateway closes,
    /// it closes first, as an HTTP server does, and the client does not
    /// race it to the close.
    Shutdown,
}

/// Writes all of `write` to `stream` at the end of the turn, with the
/// turn's other writes; gives both back, with the outcome. A write that
/// fails has sent nothing, unless part of it went out before a later
/// error. What the socket did not take at once must find room within
/// `idle`, else the write fails (`TimedOut`). `then` says whether the
/// stream's sending side is shut down once the write is all out.
pub async fn write_all(
    stream: Socket,
    write: Gathered,
    idle: Duration,
    then: Then,
) -> (Socket, Gathered, io::Result<()>) {
    if write.is_empty() {
        if then == Then::Shutdown {
            shut_down(&stream);
        }
        return (stream, write, Ok(()));
    }
    let queued = batch::enqueue(stream, write, then);
    // Without batching too, so that the writes of a turn still go out
    // close together.
    end_of_turn().await;
    let (mut stream, write, sent) = match queued {
        Ok(ticket) => ticket.take(),
        // Not batched here: nothing has been tried yet.
        Err((stream, write)) => (stream, write, Err(io::ErrorKind::WouldBlock.into())),
    };
    let rest = match sent {
        // All out with the batch, which shut the sending side down if asked.
        Ok(n) if n == write.len() => return (stream, write, Ok(())),
        // The socket took part of it: the rest waits for room.
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return (stream, write, Err(e)),
    };
    let result = write_now(&mut stream, &write.buf, &write.pieces, rest, idle).await;
    if result.is_ok() && then == Then::Shutdown {
        shut_down(&stream);
    }
    (stream, write, result)
}

/// Shuts `stream`'s sending side down: the peer reads the end of the
/// stream after what was sent. A failure (the peer is already gone) leaves
/// nothing to do: the stream is closed soon after anyway.
pub fn shut_down(stream: &Socket) {
    let Some(fd) = stream.fd() else {
        return;
    };
    if let Err(e) = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write) {
        tracing::debug!(error = %e, "shutting a connection's sending side down failed");
    }
}

/// Turns batched writes on for the current thread, if io_uring can be used
/// here; returns whether it is on. Each worker calls it once, on its own
/// thread.
pub fn batch_writes() -> bool {
    batch::enable()
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

mod batch;
mod pieces;
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod ring;

/// Where io_uring is not (another OS): no ring can be made, and every
/// write is a `send` of its own.
#[cfg(not(target_os = "linux"))]
mod ring {
    use std::io;

    pub const RING_SIZE: usize = 128;

    pub struct Outgoing {
        pub fd: i32,
        pub write: super::Gathered,
        pub sent: Option<io::Result<usize>>,
    }

    pub struct Ring {
        pub submissions: u64,
        never: std::convert::Infallible,
    }

    impl Ring {
        pub fn new() -> io::Result<Self> {
            Err(io::ErrorKind::Unsupported.into())
        }

        pub fn send_all(self: Box<Self>, _: &mut [Outgoing]) -> Result<Box<Self>, ()> {
            match self.never {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Waker};

    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    /// The two ends of a loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap());
        let (near, accepted) = tokio::join!(near, listener.accept());
        (near.unwrap(), accepted.unwrap().0)
    }

    /// Turns batching on for the test's thread. The tests that call it
    /// are ignored where io_uring does not work (build.rs asks the kernel).
    fn batching() {
        assert!(
            batch_writes(),
            "io_uring worked when the tests were built, but not now"
        );
    }

    #[cfg_attr(not(io_uring), ignore = "io_uring is unavailable on this machine")]
    #[tokio::test]
    async fn the_writes_of_one_turn_go_out_in_one_system_call() {
        batching();
        let mut pairs = Vec::new();
        for _ in 0..16 {
            pairs.push(pair().await);
        }
        let before = batch::submissions();
        // Spawned together, the writers run in the same turn.
        let (writers, readers): (Vec<_>, Vec<_>) = (0..16u8)
            .zip(pairs)
            .map(|(i, (near, far))| {
                (
                    spawn_write(near, vec![i; 100 + i as usize], Then::More),
                    far,
                )
            })
            .unzip();
        for (i, (writer, mut reader)) in writers.into_iter().zip(readers).enumerate() {
            let (stream, written, result) = writer.await.unwrap();
            result.unwrap();
            assert_eq!(written.buf, vec![i as u8; 100 + i], "the bytes come back");
            drop(stream);
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, written.buf);
        }
        assert_eq!(
            batch::submissions() - before,
            1,
            "16 writes, one submission"
        );
    }

    /// Spawns the write of `bytes` to `stream`: writers spawned together
    /// run in the same turn, so their writes go out in one batch.
    fn spawn_write(
        stream: impl Into<Socket>,
        bytes: Vec<u8>,
        then: Then,
    ) -> tokio::task::JoinHandle<(Socket, Gathered, io::Result<()>)> {
        tokio::spawn(write_all(stream.into(), Gathered::of(bytes), IDLE, then))
    }

    /// Reads exactly `len` bytes from `stream`.
    async fn read_len(mut stream: TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        stream.read_exact(&mut got).await.unwrap();
        got
    }

    #[cfg_attr(not(io_uring), ignore = "io_uring is unavailable on this machine")]
    #[tokio::test]
    async fn what_a_socket_does_not_take_goes_out_as_it_drains() {
        batching();
        // Two writes, so that they go through the ring; each larger than
        // loopback's socket buffers.
        let big: Vec<u8> = (0..32 << 20).map(|i: u32| i as u8).collect();
        let (a, a_reader) = pair().await;
        let (b, b_reader) = pair().await;
        let before = batch::submissions();
        let a = spawn_write(a, big.clone(), Then::More);
        let b = spawn_write(b, big.clone(), Then::More);
        let a_read = tokio::spawn(read_len(a_reader, big.len()));
        let b_read = tokio::spawn(read_len(b_reader, big.len()));
        for writer in [a, b] {
            let (_stream, _, result) = writer.await.unwrap();
            result.unwrap();
        }
        assert_eq!(batch::submissions() - before, 1, "sent through the ring");
        assert!(a_read.await.unwrap() == big);
        assert!(b_read.await.unwrap() == big);
    }

    #[cfg_attr(not(io_uring), ignore = "io_uring is unavailable on this machine")]
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
                batching();
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
                let before = batch::submissions();
                let late = spawn_write(full, b"late".to_vec(), Then::More);
                let first = spawn_write(other, b"first".to_vec(), Then::More);
                let (_other, _, result) = first.await.unwrap();
                result.unwrap();
                assert_eq!(read_len(other_reader, 5).await, b"first");
                assert_eq!(batch::submissions() - before, 1);
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

    #[cfg_attr(not(io_uring), ignore = "io_uring is unavailable on this machine")]
    #[tokio::test]
    async fn a_write_whose_task_is_dropped_before_the_turn_ends_is_never_sent() {
        batching();
        let (dropped, mut dropped_reader) = pair().await;
        let (kept, mut kept_reader) = pair().await;
        let mut cx = Context::from_waker(Waker::noop());
        let mut cancelled = Box::pin(write_all(
            dropped.into(),
            Gathered::of(b"never".to_vec()),
            IDLE,
            Then::More,
        ));
        assert!(
            cancelled.as_mut().poll(&mut cx).is_pending(),
            "waits for the end of the turn"
        );
        drop(cancelled);
        let mut other = Box::pin(write_all(
            kept.into(),
            Gathered::of(b"sent".to_vec()),
            IDLE,
            Then::More,
        ));
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

    #[cfg_attr(not(io_uring), ignore = "io_uring is unavailable on this machine")]
    #[tokio::test]
    async fn a_write_to_a_reset_connection_fails_and_the_others_go_out() {
        batching();
        let (reset, reset_peer) = pair().await;
        // Closing with a zero linger resets the connection at once.
        reset_peer.set_zero_linger().unwrap();
        drop(reset_peer);
        let (fine, mut fine_reader) = pair().await;
        let before = batch::submissions();
        let reset = spawn_write(reset, b"lost".to_vec(), Then::More);
        let fine = spawn_write(fine, b"kept".to_vec(), Then::More);
        let (_, written, result) = reset.await.unwrap();
        assert!(result.is_err(), "{result:?}");
        assert_eq!(written.buf, b"lost", "the bytes come back with the error");
        let (fine, _, result) = fine.await.unwrap();
        result.unwrap();
        assert_eq!(batch::submissions() - before, 1);
        drop(fine);
        let mut got = Vec::new();
        fine_reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"kept");
    }

    /// Everything `stream` receives until its peer closes.
    async fn read_all(mut stream: TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        got
    }

    /// `buf` with a piece of `pieces` bytes placed at each of `at`, and
    /// the bytes the write must send.
    fn gathered(buf: &[u8], at: &[usize], piece: usize) -> (Gathered, Vec<u8>) {
        let mut write = Gathered::of(buf.to_vec());
        let mut expected = Vec::new();
        let mut from = 0;
        for (i, &at) in at.iter().enumerate() {
            let data: Vec<u8> = (0..piece).map(|j| (i * 31 + j) as u8).collect();
            expected.extend_from_slice(&buf[from..at]);
            expected.extend_from_slice(&data);
            write.pieces.push(at, Bytes::from(data));
            from = at;
        }
        expected.extend_from_slice(&buf[from..]);
        (write, expected)
    }

    #[cfg_attr(not(io_uring), ignore = "io_uring is unavailable on this machine")]
    #[tokio::test]
    async fn pieces_go_out_in_place_with_the_batch_even_beyond_what_a_socket_takes() {
        batching();
        let head = b"HEAD / HTTP/1.1\r\n\r\n-between-tail";
        // One write small enough to go out whole, one far larger than
        // loopback's socket buffers, whose rest goes out as it drains.
        let (small, small_expected) = gathered(head, &[0, 19, 19, 28], 5000);
        let (large, large_expected) = gathered(head, &[19, 28, head.len()], 12 << 20);
        let (a, a_reader) = pair().await;
        let (b, b_reader) = pair().await;
        let before = batch::submissions();
        let a = tokio::spawn(write_all(a.into(), small, IDLE, Then::More));
        let b = tokio::spawn(write_all(b.into(), large, IDLE, Then::More));
        let a_read = tokio::spawn(read_all(a_reader));
        let b_read = tokio::spawn(read_all(b_reader));
        for writer in [a, b] {
            let (stream, written, result) = writer.await.unwrap();
            result.unwrap();
            assert_eq!(written.buf, head, "the buffer comes back");
            drop(stream);
        }
        assert_eq!(batch::submissions() - before, 1, "sent through the ring");
        assert!(a_read.await.unwrap() == small_expected);
        assert!(b_read.await.unwrap() == large_expected);
    }

    /// Reads `stream` to its end, failing if the end does not come while
    /// the writer still holds its end of the connection open.
    async fn read_to_shutdown(stream: TcpStream) -> Vec<u8> {
        tokio::time::timeout(Duration::from_secs(10), read_all(stream))
            .await
            .expect("the end of the stream came right behind the bytes")
    }

    #[cfg_attr(not(io_uring), ignore = "io_uring is unavailable on this machine")]
    #[tokio::test]
    async fn a_last_write_is_followed_by_the_end_of_the_stream() {
        batching();
        // In one batch: a last write that fits, a last write larger than
        // loopback's socket buffers (its end comes once its rest is out),
        // and a write after which the stream stays open.
        let small = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbye".to_vec();
        let large: Vec<u8> = (0..24 << 20).map(|i: u32| (i % 251) as u8).collect();
        let (a, a_reader) = pair().await;
        let (b, b_reader) = pair().await;
        let (c, mut c_reader) = pair().await;
        let before = batch::submissions();
        let a = spawn_write(a, small.clone(), Then::Shutdown);
        let b = spawn_write(b, large.clone(), Then::Shutdown);
        let c = spawn_write(c, b"more".to_vec(), Then::More);
        let a_read = tokio::spawn(read_to_shutdown(a_reader));
        let b_read = tokio::spawn(read_to_shutdown(b_reader));
        // The writers' ends stay open until the readers have seen the end.
        let mut held = Vec::new();
        for writer in [a, b, c] {
            let (stream, _, result) = writer.await.unwrap();
            result.unwrap();
            held.push(stream);
        }
        assert_eq!(batch::submissions() - before, 1, "sent through the ring");
        assert!(a_read.await.unwrap() == small);
        assert!(b_read.await.unwrap() == large);
        // A stream that may carry more still does.
        let c = held.pop().unwrap();
        let (c, _, result) =
            write_all(c, Gathered::of(b" and more".to_vec()), IDLE, Then::More).await;
        result.unwrap();
        drop((c, held));
        let mut got = Vec::new();
        c_reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"more and more");
    }

    #[test]
    fn without_batching_a_last_write_is_followed_by_the_end_of_the_stream() {
        without_batching(|| async {
            for size in [5, 12 << 20] {
                let (near, far) = pair().await;
                let bytes: Vec<u8> = (0..size).map(|i: u32| (i % 253) as u8).collect();
                let reading = tokio::spawn(read_to_shutdown(far));
                let (_near, _, result) = write_all(
                    near.into(),
                    Gathered::of(bytes.clone()),
                    IDLE,
                    Then::Shutdown,
                )
                .await;
                result.unwrap();
                assert!(reading.await.unwrap() == bytes);
            }
        });
    }

    /// Runs `test` on a fresh thread, on which nothing turned batching on.
    fn without_batching<F: Future<Output = ()>>(test: impl FnOnce() -> F + Send + 'static) {
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(test());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn without_batching_pieces_go_out_in_place() {
        without_batching(|| async {
            let (near, far) = pair().await;
            let (write, expected) = gathered(b"0123456789", &[0, 4, 10], 3 << 20);
            let reading = tokio::spawn(read_all(far));
            let (near, _, result) = write_all(near.into(), write, IDLE, Then::More).await;
            result.unwrap();
            drop(near);
            assert!(reading.await.unwrap() == expected);
            assert_eq!(batch::submissions(), 0, "no ring on this thread");
        });
    }

    #[test]
    fn without_batching_writes_go_out_one_by_one() {
        without_batching(|| async {
            let (near, mut far) = pair().await;
            let (near, _, result) = write_all(
                near.into(),
                Gathered::of(b"hello".to_vec()),
                IDLE,
                Then::More,
            )
            .await;
            result.unwrap();
            drop(near);
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            assert_eq!(batch::submissions(), 0, "no ring on this thread");
        });
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
