//! One HTTP/1.1 connection to an instance, driven by the task of the request
//! that uses it.
//!
//! hyper's client runs every connection as a task of its own: a request
//! travels to it over a channel, the response comes back over another, and
//! each body chunk over a third. Here the request's own task writes the
//! request and reads the response head, and the response body reads straight
//! from the socket as the client side pulls it; when the body ends the
//! connection goes back to its pool. Besides saving those hops (callgrind:
//! 12% fewer instructions per proxied request), it gives the proxy the
//! answers it needs that hyper's client does not: an early answer (say 413)
//! from an instance that stopped reading a large upload is passed back
//! instead of a write error, and a `101 Switching Protocols` is an error
//! rather than a response that cannot be honoured.
//!
//! The bytes are the codec's ([`crate::http1`]): request framing from the
//! body (`Content-Length` when its size is known, else chunked), response
//! heads and bodies read by its rules. A connection is reused only after a
//! persistent response read to its exact end. Requests arrive with their
//! head already encoded ([`Outbound`]), once per client request rather than
//! rebuilt for every attempt.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Response};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Outbound;
use super::pool::Pool;
use super::recycle;
use crate::body::{Body, BoxError};
use crate::http1::encode::{self, Encoder};
use crate::http1::{Decoded, Decoder, head};
use crate::splice::{self, Splicer};
use crate::write_batch::{Gathered, PIECE_MIN, Then};

/// Response heads larger than this are an error.
const MAX_HEAD: usize = 64 * 1024;
/// Request bodies of known size up to this go out with the head, in one
/// write (their large chunks as pieces, [`PIECE_MIN`]).
const COALESCE: u64 = 64 * 1024;
/// How much the read buffer grows by, at least and at most: each
/// connection learns its size from its reads ([`ReadSize`]). The buffer
/// takes heads, framing and what comes with them; a body's data beyond
/// that is read into recycled buffers ([`poll_direct`]).
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 64 * 1024;
/// How long to look for an answer the instance sent before it stopped
/// taking the request body.
const EARLY_ANSWER: Duration = Duration::from_secs(1);

/// An open connection to an instance.
pub struct UpstreamConnection {
    io: TcpStream,
    /// Bytes read and not yet consumed.
    read: BytesMut,
    /// How much the read buffer grows by next.
    read_size: ReadSize,
    /// The generation of the upstream policy its address was checked
    /// against ([`super::policy::UpstreamPolicy::generation`]).
    pub(super) policy_generation: u64,
}

/// Why a request failed on a connection.
#[derive(Debug)]
pub enum SendError {
    /// Not a byte of it was written: it can go out on another connection.
    Unsent(Box<Outbound>, io::Error),
    /// The client's request body failed (stalled, broke off) while it was
    /// being sent: the client's fault, not the instance's.
    ClientBody(BoxError),
    /// The exchange failed once writing had begun.
    Failed(BoxError),
}

/// Why a streamed request body did not make it.
enum BodyWriteError {
    /// The client's body failed (stalled, broke off).
    Source(BoxError),
    /// Writing to the instance failed, or it took no byte for `idle_timeout`.
    Write(io::Error),
}

impl From<io::Error> for BodyWriteError {
    fn from(e: io::Error) -> Self {
        Self::Write(e)
    }
}

impl UpstreamConnection {
    /// A connection to an address the upstream policy of generation
    /// `policy_generation` allowed.
    pub fn new(io: TcpStream, policy_generation: u64) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            read_size: ReadSize::default(),
            policy_generation,
        }
    }

    /// Whether an idle connection is still fit for a request: nothing
    /// arrived while it sat idle, neither the instance closing it nor stray
    /// bytes. Costs no system call unless the socket became readable.
    pub fn is_reusable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Lets go of the read buffer, which holds nothing between responses,
    /// and starts its reads small again: a connection kept idle for long
    /// then costs its socket, not 64 KiB (nor a large reader's place).
    pub fn shed_read_buffer(&mut self) {
        if self.read.is_empty() {
            self.read = BytesMut::new();
            self.read_size.shrink();
        }
    }

    /// Sends `request` and reads the response head. The response body
    /// reads from this connection, and gives it back to `pool` (if any) at
    /// its end; without a pool, the body keeps it at its end for the caller
    /// to take ([`UpstreamBody::into_connection`]). A streamed request body
    /// that the instance takes no byte of for `idle_timeout` fails the
    /// exchange.
    pub async fn send(
        mut self,
        request: Outbound,
        pool: Option<Arc<Pool>>,
        idle_timeout: Duration,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let Outbound {
            method,
            mut head,
            declare_empty,
            mut body,
            deadline,
        } = request;
        let head_request = method == Method::HEAD;
        let size = body.size_hint().exact();
        let fields_end = head.len();
        let mut encoder = encode::request_framing(&mut head, size, declare_empty);
        // A body of known size up to COALESCE is read whole and goes out
        // with the head, in one write: its small chunks copied behind the
        // head, its large ones as they are (`Pieces`).
        let mut write = Gathered::of(head);
        let inline = match size {
            Some(n) if n <= COALESCE => {
                let body_start = write.buf.len();
                // Room for a body that is all copied.
                write.buf.reserve((n as usize).min(PIECE_MIN));
                while let Some(frame) = body.frame().await {
                    if let Ok(chunk) = frame.map_err(SendError::ClientBody)?.into_data() {
                        if chunk.len() >= PIECE_MIN && !write.pieces.is_full() {
                            write.pieces.push(write.buf.len(), chunk);
                        } else {
                            write.buf.extend_from_slice(&chunk);
                        }
                    }
                }
                Some(body_start)
            }
            _ => None,
        };
        // The request goes out at the end of the event loop's turn, with
        // the others of that turn: an instance then wakes once for the
        // batch, not once per request.
        let (io, written, result) =
            crate::write_batch::write_all(self.io.into(), write, idle_timeout, Then::More).await;
        // Given back as it was given: registered.
        self.io = io
            .into_registered()
            .map_err(|e| SendError::Failed(e.into()))?;
        let Gathered {
            buf: mut head,
            pieces,
        } = written;
        if let Err(e) = result {
            // The connection was dead before anything of ours got through.
            let body = match inline {
                Some(body_start) => {
                    let all = Bytes::from(pieces.joined(&head));
                    crate::body::full(all.slice(body_start..))
                }
                None => body,
            };
            head.truncate(fields_end);
            let request = Outbound {
                method,
                head,
                declare_empty,
                body,
                deadline,
            };
            return Err(SendError::Unsent(Box::new(request), e));
        }
        drop(pieces);
        drop(head);
        if inline.is_none() {
            match self.write_body(body, &mut encoder, idle_timeout).await {
                Ok(()) => {}
                Err(BodyWriteError::Source(e)) => return Err(SendError::ClientBody(e)),
                Err(BodyWriteError::Write(e)) => {
                    // The instance may have answered early (say 413) and
                    // stopped reading: its answer, if already here, beats
                    // our write error.
                    let early =
                        tokio::time::timeout(EARLY_ANSWER, self.read_head(head_request)).await;
                    return match early {
                        Ok(Ok(head)) => Ok(UpstreamBody::respond(head, self, false, pool)),
                        _ => Err(SendError::Failed(e.into())),
                    };
                }
            }
        }
        let head = self
            .read_head(head_request)
            .await
            .map_err(SendError::Failed)?;
        let reusable = head.keep_alive;
        Ok(UpstreamBody::respond(head, self, reusable, pool))
    }

    /// Streams `body` to the instance, each write bounded by `idle_timeout`.
    async fn write_body(
        &mut self,
        mut body: Body,
        encoder: &mut Encoder,
        idle_timeout: Duration,
    ) -> Result<(), BodyWriteError> {
        let mut framing = Vec::with_capacity(24);
        while let Some(frame) = body.frame().await {
            // Request trailers are not forwarded.
            let Ok(data) = frame.map_err(BodyWriteError::Source)?.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            framing.clear();
            encoder
                .before_data(&mut framing, data.len())
                .map_err(|e| BodyWriteError::Source(e.into()))?;
            let write = async {
                self.io.write_all(&framing).await?;
                self.io.write_all(&data).await?;
                framing.clear();
                encoder.after_data(&mut framing);
                self.io.write_all(&framing).await
            };
            stalled_after(idle_timeout, write).await??;
        }
        framing.clear();
        encoder
            .finish(&mut framing)
            .map_err(|e| BodyWriteError::Source(e.into()))?;
        stalled_after(idle_timeout, self.io.write_all(&framing)).await??;
        Ok(())
    }

    /// Reads until a complete final (non-1xx) response head.
    async fn read_head(&mut self, head_request: bool) -> Result<head::ResponseHead, BoxError> {
        loop {
            if let Some(head) = head::parse_response(&mut self.read, head_request, MAX_HEAD)? {
                return Ok(head);
            }
            let filled = std::future::poll_fn(|cx| {
                poll_fill(&mut self.io, &mut self.read, &mut self.read_size, cx)
            })
            .await?;
            if filled == 0 {
                return Err("the connection closed before the response head".into());
            }
        }
    }
}

/// `future`, or a timed-out error once `idle` has passed.
async fn stalled_after<T>(idle: Duration, future: impl Future<Output = T>) -> Result<T, io::Error> {
    tokio::time::timeout(idle, future).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the instance took no request body for idle_timeout",
        )
    })
}

/// Reads what the socket has into `read`; 0 means the instance closed.
fn poll_fill(
    io: &mut TcpStream,
    read: &mut BytesMut,
    size: &mut ReadSize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if read.capacity() - read.len() < 1024 {
        read.reserve(size.next());
    }
    // What the connection learned, even with more room: a buffer grown
    // for one large body does not make every later head read large.
    let room = (read.capacity() - read.len()).min(size.next());
    let mut limited = bytes::BufMut::limit(&mut *read, room);
    let n = ready!(tokio_util::io::poll_read_buf(
        Pin::new(io),
        cx,
        &mut limited
    ))?;
    size.record(n, room);
    Poll::Ready(Ok(n))
}

/// Body data at least this large still to come is read straight into a
/// recycled buffer ([`super::recycle`]) rather than the connection's own.
const DIRECT_MIN: u64 = READ_MIN as u64;

/// Reads up to `want` bytes (at most [`recycle::SIZE`]) into a recycled
/// buffer, taken only once the socket has something; `None` when the
/// instance closed the connection.
fn poll_direct(
    io: &mut TcpStream,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Option<Bytes>>> {
    loop {
        ready!(io.poll_read_ready(cx))?;
        let mut buf = recycle::take();
        let room = want.min(buf.len());
        match io.try_read(&mut buf[..room]) {
            Ok(0) => {
                recycle::give(buf);
                return Poll::Ready(Ok(None));
            }
            Ok(n) => return Poll::Ready(Ok(Some(recycle::freeze(buf, n)))),
            // The readiness was stale (and is cleared now): wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => recycle::give(buf),
            Err(e) => {
                recycle::give(buf);
                return Poll::Ready(Err(e));
            }
        }
    }
}

/// How much a connection's read buffer grows by, learned from its reads:
/// [`READ_MIN`] to begin with, more once a read fills the room it had, and
/// back to [`READ_MIN`] after two reads in a row of less than half of
/// [`READ_MIN`]. A connection carrying small answers keeps 8 KiB; one
/// carrying a large body reads [`READ_MAX`] at a time, if fewer than
/// [`LARGE_READERS`] connections gateway-wide already do, else 32 KiB
/// ([`READ_MID`]): a bound on the memory that many connections at once
/// hold (at 512 connections streaming 256 KiB answers, 64 KiB each made
/// the peak RSS 86-95 MB). 32 KiB takes a 16 KiB answer in one read.
#[derive(Debug)]
struct ReadSize {
    next: usize,
    /// The last read was small: one more and the size goes back down.
    small: bool,
    /// It holds one of the [`LARGE_READERS`].
    large: bool,
}

/// Connections that may read [`READ_MAX`] at a time, gateway-wide.
const LARGE_READERS: usize = 128;
/// Connections reading [`READ_MAX`] at a time now.
static LARGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// What a connection denied a large read size reads at a time.
const READ_MID: usize = 32 * 1024;

impl Default for ReadSize {
    fn default() -> Self {
        Self {
            next: READ_MIN,
            small: false,
            large: false,
        }
    }
}

impl ReadSize {
    fn next(&self) -> usize {
        self.next
    }

    /// Learns from a read that took `n` bytes with `room` to take them.
    fn record(&mut self, n: usize, room: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if n >= room {
            self.small = false;
            if self.large {
                return;
            }
            if LARGE.fetch_add(1, Relaxed) < LARGE_READERS {
                self.large = true;
                self.next = READ_MAX;
            } else {
                LARGE.fetch_sub(1, Relaxed);
                self.next = READ_MID;
            }
        } else if n < READ_MIN / 2 {
            if self.small {
                self.shrink();
            }
            self.small = !self.small;
        } else {
            self.small = false;
        }
    }

    /// Back to the smallest size, giving up a large reader's place.
    fn shrink(&mut self) {
        if std::mem::take(&mut self.large) {
            LARGE.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.next = READ_MIN;
    }
}

impl Drop for ReadSize {
    fn drop(&mut self) {
        self.shrink();
    }
}

/// A response body read straight from its connection, which goes back to
/// its pool at the body's exact end. Dropped earlier, it closes the
/// connection: a half-read message cannot be abandoned on HTTP/1.
pub struct UpstreamBody {
    conn: Option<UpstreamConnection>,
    decoder: Decoder,
    reusable: bool,
    pool: Option<Arc<Pool>>,
    /// For a large body framed by its length: moves it to the client's
    /// socket once the writer lends it ([`crate::splice`]).
    splicer: Option<Splicer>,
}

impl UpstreamBody {
    /// The response to `head`, its body to be read from `conn`.
    fn respond(
        head: head::ResponseHead,
        conn: UpstreamConnection,
        reusable: bool,
        pool: Option<Arc<Pool>>,
    ) -> Response<Self> {
        let decoder = Decoder::new(head.body);
        let (splicer, handoff) = match decoder {
            Decoder::Length(n) => Splicer::for_length(n).unzip(),
            _ => (None, None),
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            decoder,
            reusable,
            pool,
            splicer,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        let mut response = Response::new(body);
        if let Some(handoff) = handoff {
            response.extensions_mut().insert(handoff);
        }
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        response
    }

    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        let reusable = self.reusable && self.conn.as_ref().is_some_and(|c| c.read.is_empty());
        match &self.pool {
            Some(pool) if reusable => {
                if let Some(conn) = self.conn.take() {
                    pool.checkin(conn);
                }
            }
            // Kept for whoever sent the request to take.
            None if reusable => {}
            _ => self.conn = None,
        }
    }

    /// Hands on a piece of body the decoder has counted; at the body's end
    /// the connection goes back.
    fn data(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.decoder.is_done() {
            self.finish();
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// The instance closed the connection: the end of a body that runs
    /// until then, an error for one cut short.
    fn closed(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Err(e) = self.decoder.end_of_input() {
            return Poll::Ready(Some(Err(e.into())));
        }
        self.finish();
        Poll::Ready(None)
    }

    /// The body once the client's socket is lent: everything in flight
    /// is delivered before more is taken from the instance, and each frame
    /// stands for bytes delivered ([`crate::splice::delivered`]).
    fn poll_spliced(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut delivered = 0;
        let mut closed = false;
        while delivered + splice::PIPE_SIZE <= splice::FRAME_MAX {
            let Some(splicer) = self.splicer.as_mut() else {
                break;
            };
            let n = match splicer.poll_deliver(cx) {
                Poll::Ready(n) => n?,
                Poll::Pending if delivered > 0 => break,
                Poll::Pending => return Poll::Pending,
            };
            delivered += n;
            if n > 0 {
                continue;
            }
            // Nothing in flight: take more from the instance.
            let Some(conn) = self.conn.as_mut().filter(|_| !self.decoder.is_done()) else {
                break;
            };
            match self.decoder.decode(&mut conn.read)? {
                Decoded::Data(data) => splicer.hold(data),
                Decoded::Done => {}
                Decoded::NeedMore => {
                    let Some(left) = self.decoder.raw_data() else {
                        return Poll::Ready(Some(Err("a spliced body lost its length".into())));
                    };
                    debug_assert!(conn.read.is_empty());
                    // The body's bytes are spliced, not read: the next
                    // head is read small, with little of its body.
                    conn.read_size.shrink();
                    let want = usize::try_from(left).unwrap_or(usize::MAX);
                    let taken = if splicer.has_pipe() {
                        splicer.poll_take(&conn.io, want, cx)
                    } else {
                        // No pipe to be had: read the rest as any body
                        // is read, and deliver it from memory.
                        poll_direct(&mut conn.io, want, cx).map_ok(|data| {
                            let data = data.unwrap_or_default();
                            let n = data.len();
                            splicer.hold(data);
                            n
                        })
                    };
                    let n = match taken {
                        Poll::Ready(n) => n?,
                        Poll::Pending if delivered > 0 => break,
                        Poll::Pending => return Poll::Pending,
                    };
                    if n == 0 {
                        closed = true;
                        break;
                    }
                    self.decoder.took(n as u64);
                }
            }
            if self.decoder.is_done() {
                self.finish();
            }
        }
        if delivered > 0 {
            Poll::Ready(Some(Ok(Frame::data(splice::delivered(delivered)))))
        } else if closed {
            self.closed()
        } else {
            Poll::Ready(None)
        }
    }

    /// Body bytes spliced from the instance and not yet delivered.
    fn in_flight(&self) -> usize {
        self.splicer.as_ref().map_or(0, Splicer::in_flight)
    }

    /// The connection, once a response sent without a pool has been read
    /// to its end and may carry another request; else `None`, and the
    /// connection is closed.
    pub fn into_connection(mut self) -> Option<UpstreamConnection> {
        if self.decoder.is_done() && self.pool.is_none() {
            self.conn.take()
        } else {
            None
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.splicer.as_ref().is_some_and(Splicer::is_lent) {
            return this.poll_spliced(cx);
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.read)? {
                Decoded::Data(data) => return this.data(data),
                Decoded::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Decoded::NeedMore => {
                    // Body data with no framing among it comes next: read
                    // it into a recycled buffer and pass it on whole.
                    if let Some(left) = this.decoder.raw_data().filter(|&n| n >= DIRECT_MIN) {
                        debug_assert!(conn.read.is_empty());
                        let want = usize::try_from(left).unwrap_or(usize::MAX);
                        return match ready!(poll_direct(&mut conn.io, want, cx))? {
                            Some(data) => {
                                this.decoder.took(data.len() as u64);
                                this.data(data)
                            }
                            None => this.closed(),
                        };
                    }
                    if ready!(poll_fill(
                        &mut conn.io,
                        &mut conn.read,
                        &mut conn.read_size,
                        cx
                    ))? == 0
                    {
                        return this.closed();
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done() && self.in_flight() == 0
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(left) => SizeHint::with_exact(left + self.in_flight() as u64),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_read_size_goes_up_with_a_full_read_and_down_after_two_small_ones() {
        let mut size = ReadSize::default();
        assert_eq!(size.next(), READ_MIN);
        size.record(100, READ_MIN);
        size.record(100, READ_MIN);
        assert_eq!(size.next(), READ_MIN);
        size.record(READ_MIN, READ_MIN);
        assert_eq!(size.next(), READ_MAX, "a full read: up to the largest");
        size.record(100, READ_MAX);
        assert_eq!(size.next(), READ_MAX, "one small read is not enough");
        size.record(READ_MAX, READ_MAX);
        size.record(100, READ_MAX);
        assert_eq!(size.next(), READ_MAX, "a full read in between starts over");
        size.record(100, READ_MAX);
        assert_eq!(size.next(), READ_MIN);
        size.record(READ_MIN, 2 * READ_MIN);
        size.record(READ_MIN, 2 * READ_MIN);
        assert_eq!(
            size.next(),
            READ_MIN,
            "reads that are not small keep the size"
        );
    }

    #[test]
    fn only_so_many_connections_read_large_at_once() {
        // Other tests' connections may hold places: count from what is free.
        let mut sizes: Vec<ReadSize> = Vec::new();
        loop {
            let mut size = ReadSize::default();
            size.record(READ_MIN, READ_MIN);
            let large = size.next() == READ_MAX;
            sizes.push(size);
            if !large {
                break;
            }
            assert!(sizes.len() <= LARGE_READERS, "no more than the limit");
        }
        assert_eq!(
            sizes.last().unwrap().next(),
            READ_MID,
            "past the limit: 32 KiB"
        );
        // A place given up (a connection closed or back to small reads)
        // goes to the next connection that needs it.
        sizes.remove(0);
        let mut size = ReadSize::default();
        size.record(READ_MIN, READ_MIN);
        assert_eq!(size.next(), READ_MAX);
    }

    #[test]
    fn request_heads_take_their_framing_from_the_body() {
        let head = |method: Method, size, declared: bool| {
            let host = HeaderValue::from_static("h");
            let mut request = Outbound::new(
                method,
                &["/a", "?b"],
                &host,
                b"x: 1\r\n",
                crate::body::empty(),
            );
            encode::request_framing(&mut request.head, size, request.declare_empty || declared);
            String::from_utf8(request.head).unwrap()
        };
        assert_eq!(
            head(Method::GET, Some(0), true),
            "GET /a?b HTTP/1.1\r\nhost: h\r\nx: 1\r\ncontent-length: 0\r\n\r\n",
            "a client's Content-Length: 0 goes on"
        );
        assert_eq!(
            head(Method::GET, Some(0), false),
            "GET /a?b HTTP/1.1\r\nhost: h\r\nx: 1\r\n\r\n"
        );
        assert_eq!(
            head(Method::POST, Some(0), false),
            "POST /a?b HTTP/1.1\r\nhost: h\r\nx: 1\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(
            head(Method::POST, None, false),
            "POST /a?b HTTP/1.1\r\nhost: h\r\nx: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    /// Once the writer lends the client's socket, the body writes the
    /// head it was given, then itself (the part read with the instance's
    /// head too), whole and in order, and yields only stand-ins for what
    /// it delivered; the socket comes back at the end, and the pipe to
    /// this worker's pool.
    #[tokio::test]
    async fn a_lent_socket_gets_the_head_then_the_whole_body() {
        lent_socket_gets_head_then_body().await;
        assert_eq!(crate::splice::pipes::kept(), 1, "spliced through a pipe");
    }

    /// Without a pipe to be had (the open-files limit reached), the same
    /// answer goes through memory, whole.
    #[tokio::test]
    async fn without_a_pipe_a_lent_socket_still_gets_the_whole_body() {
        use crate::splice::pipes::{self, Scarce};
        pipes::make_scarce(Scarce::Pipes);
        lent_socket_gets_head_then_body().await;
        assert_eq!(pipes::kept(), 0, "no pipe was used");
    }

    /// Pipes of one page (the user's pipe allowance used up) carry it
    /// whole, a page at a time.
    #[tokio::test]
    async fn through_a_one_page_pipe_a_lent_socket_gets_the_whole_body() {
        use crate::splice::pipes::{self, Scarce};
        pipes::make_scarce(Scarce::Pages);
        lent_socket_gets_head_then_body().await;
        assert_eq!(pipes::kept(), 1, "spliced through a pipe");
    }

    async fn lent_socket_gets_head_then_body() {
        use crate::splice::{Handoff, is_delivered};
        use tokio::io::AsyncReadExt;
        use tokio::net::TcpListener;

        let len = 3 * crate::splice::PIPE_SIZE + 12_345;
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = body.clone();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await.unwrap();
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
            // Some of the body with the head, the rest in uneven pieces.
            stream
                .write_all(&[head.as_bytes(), &sent[..1000]].concat())
                .await
                .unwrap();
            for piece in sent[1000..].chunks(70_001) {
                stream.write_all(piece).await.unwrap();
            }
        });
        let host = HeaderValue::from_static("h");
        let request = Outbound::new(Method::GET, &["/"], &host, b"", crate::body::empty());
        let stream = TcpStream::connect(addr).await.unwrap();
        let response = UpstreamConnection::new(stream, 0)
            .send(request, None, Duration::from_secs(5))
            .await
            .unwrap();
        let handoff = response.extensions().get::<Handoff>().cloned();
        let handoff = handoff.expect("a body this large can be spliced");

        let client_side = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(client_side.local_addr().unwrap())
            .await
            .unwrap();
        let (lent, _) = client_side.accept().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < len + 5 {
                assert_ne!(client.read_buf(&mut got).await.unwrap(), 0);
            }
            got
        });
        handoff.lend(lent.into(), b"head|".to_vec());
        let mut body_frames = response.into_body();
        let mut delivered = 0;
        while let Some(frame) = body_frames.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(is_delivered(&data), "a frame of bytes not delivered");
            delivered += data.len();
        }
        assert_eq!(delivered, len);
        assert!(handoff.take_back().is_some(), "the socket comes back");
        let got = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the client reads it all")
            .unwrap();
        assert!(got[..5] == *b"head|", "the head first");
        assert!(got[5..] == body[..], "the body whole and in order");
    }

    /// A request whose connection turned out dead before a byte went out
    /// comes back whole, its inlined body included (its small chunks
    /// copied behind the head, its large ones placed between them), and
    /// goes out unchanged on the next connection.
    #[tokio::test]
    async fn a_request_unsent_on_a_dead_connection_comes_back_whole() {
        unsent_comes_back_whole(&[b"payload"]).await;
        let large = |byte: u8, len: usize| vec![byte; len];
        unsent_comes_back_whole(&[
            b"small-",
            &large(b'x', 5_000),
            b"-mid-",
            &large(b'y', 6_000),
            b"-end",
        ])
        .await;
    }

    async fn unsent_comes_back_whole(chunks: &[&[u8]]) {
        use tokio::io::AsyncReadExt;
        use tokio::net::TcpListener;

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        // The instance resets the connection while it sits idle.
        let (instance_side, _) = listener.accept().await.unwrap();
        instance_side.set_zero_linger().unwrap();
        drop(instance_side);
        stream.readable().await.unwrap();

        let host = HeaderValue::from_static("h");
        let payload = chunks.concat();
        // As a retryable request's body comes: its chunks, its exact size.
        let kept = crate::retry::replay::Kept::of(
            chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect(),
        );
        let body = kept.body();
        let request = Outbound::new(Method::POST, &["/up"], &host, b"x: 1\r\n", body);
        let idle = Duration::from_secs(5);
        let sent = UpstreamConnection::new(stream, 0)
            .send(request, None, idle)
            .await;
        let Err(SendError::Unsent(unsent, _)) = sent else {
            panic!(
                "a reset connection takes nothing: {:?}",
                sent.map(|r| r.status())
            );
        };

        let length = payload.len();
        let instance = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            // The head says how much body follows: read that much.
            let mut received = Vec::new();
            let whole = |r: &[u8]| {
                let at = r.windows(4).position(|w| w == b"\r\n\r\n")?;
                (r.len() >= at + 4 + length).then_some(())
            };
            let read = async {
                while whole(&received).is_none() {
                    assert_ne!(stream.read_buf(&mut received).await.unwrap(), 0);
                }
            };
            // A bound, not a measure: a body short of its length would
            // otherwise leave both sides waiting.
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .expect("the body came whole");
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            received
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let response = UpstreamConnection::new(stream, 0)
            .send(*unsent, None, idle)
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
        let head =
            format!("POST /up HTTP/1.1\r\nhost: h\r\nx: 1\r\ncontent-length: {length}\r\n\r\n");
        assert!(
            instance.await.unwrap() == [head.as_bytes(), &payload].concat(),
            "the request differs"
        );
    }
}
