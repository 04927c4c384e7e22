//! The gateway's HTTP/1 server: every HTTP/1.0 and HTTP/1.1 request, from
//! the first byte of a connection to its last, read with the one codec
//! ([`crate::http1`]) and answered by the stack ([`crate::stack`]).
//!
//! One connection is one task, and requests on it are served in order:
//! the next head is read only once the previous response is written, so
//! pipelined requests are answered in order, and bytes that follow a
//! request are never judged before that request's body has been framed
//! by the same decoder. A request the codec refuses (a malformed or
//! oversized head, `Content-Length` with `Transfer-Encoding`, a missing
//! or doubled `Host`) gets its 4xx and the connection closes after it;
//! what the client sent after it is never read as a request.
//!
//! Timeouts: a head must arrive whole within `header_read_timeout` of
//! when the connection started waiting for it (idle keep-alive time
//! included); a request body is held to `body_idle_timeout` by the stack;
//! after the response head, the response body must make progress both
//! ways (the instance sending, the client taking it) every
//! `idle_timeout`, else the connection is closed.
//!
//! A connection whose first bytes are the HTTP/2 preface is handed to
//! hyper's HTTP/2 server before anything is parsed ([`super::h2`]).

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::Service;

use super::Client;
use super::incoming::{self, ClientIo};
use crate::body::{self, Body, BoxError};
use crate::error::{ErrorCode, GatewayError};
use crate::http1::Decoder;
use crate::http1::encode::{self, Answering, Encoder};
use crate::http1::head::{self, BodyLength, HeadError, RequestHead};
use crate::socket::Socket;
use crate::splice::Handoff;
use crate::write_batch::{Gathered, PIECE_MIN, Pieces, Then, write_now};

/// The first bytes of every HTTP/2 connection with prior knowledge.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much the read buffer grows by while reading heads.
const READ_CHUNK: usize = 8 * 1024;
/// Small chunks ready one after the other are copied together up to this
/// much before they are written.
const FLUSH_AT: usize = 64 * 1024;
/// Large chunks ready one after the other are gathered, up to
/// [`crate::write_batch::Pieces`]' count and this much in all, and written
/// in one system call.
const GATHER_MAX: usize = 256 * 1024;
/// The write buffer a connection keeps between requests, at most.
const KEEP_OUT: usize = 4 * 1024;
/// How long a closing connection keeps reading (and dropping) what the
/// client still sends, so that the client reads the answer before the
/// close resets the connection.
const LINGER: Duration = Duration::from_secs(1);

/// How a connection's HTTP/1 life ended.
pub enum Ended {
    Closed,
    /// It is an HTTP/2 connection: the socket and the bytes read from it.
    Http2(TcpStream, BytesMut),
}

/// Serves HTTP/1 requests on `stream` until the connection ends.
pub async fn serve(client: &Client, stream: Socket) -> Result<Ended, BoxError> {
    let mut settings = Settings::of(client);
    let mut stack = client.stack.clone();
    let mut io = ClientIo {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
    };
    let mut out = Vec::with_capacity(KEEP_OUT);
    // One timer and one shutdown waiter for the connection's life, not one
    // of each per request: the timer is set for the first head's deadline
    // and, when it fires before the current head's, moved on to it.
    let mut deadline = Instant::now() + settings.header_read_timeout;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline));
    let mut draining = std::pin::pin!(client.draining.cancelled());
    let mut first = true;
    loop {
        let head = loop {
            if first && io.buf.starts_with(PREFACE) {
                return Ok(Ended::Http2(io.stream.into_registered()?, io.buf));
            }
            // Not judged until it is clearly not the HTTP/2 preface.
            let maybe_preface = first && !io.buf.is_empty() && PREFACE.starts_with(&io.buf);
            if !maybe_preface {
                match head::parse_request(&mut io.buf, settings.max_head) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(refusal) => {
                        refuse(io, refusal, &mut out, settings.idle).await;
                        return Ok(Ended::Closed);
                    }
                }
            }
            if io.buf.capacity() - io.buf.len() < 1024 {
                io.buf.reserve(READ_CHUNK);
            }
            // The read first: when the request is already there (as on a
            // connection accepted once its first bytes arrived), the timer
            // and the shutdown waiter are never polled, so never registered.
            tokio::select! {
                biased;
                n = io.stream.read_buf(&mut io.buf) => if n? == 0 {
                    return Ok(Ended::Closed);
                },
                () = &mut timer => {
                    if timer.deadline() >= deadline {
                        tracing::debug!("request head not read within header_read_timeout");
                        return Ok(Ended::Closed);
                    }
                    timer.as_mut().reset(deadline);
                }
                () = &mut draining, if io.buf.is_empty() => return Ok(Ended::Closed),
            }
        };
        first = false;

        let answering = Answering {
            head: head.method == Method::HEAD,
            version: head.version,
            keep_alive: head.keep_alive,
        };
        let (request, loan) = request(head, io);
        std::future::poll_fn(|cx| stack.poll_ready(cx)).await?;
        let response = match stack.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        // The connection back from the request's body, if it was lent.
        let (back, body_done) = match loan {
            Loan::Kept(io) => (io, true),
            Loan::Lent(loan) => match loan.take_back() {
                Some(back) => back,
                None => return Ok(Ended::Closed),
            },
        };
        io = back;
        let answering = Answering {
            // What is left of an unread body is on the connection.
            keep_alive: answering.keep_alive && body_done && !client.draining.is_cancelled(),
            ..answering
        };
        let keep_alive;
        (io.stream, keep_alive) =
            write_response(io.stream, response, answering, &mut out, settings.idle).await?;
        if !keep_alive {
            // Unread bytes (a body, pipelined requests) would turn the close
            // into a reset that can destroy the answer in flight.
            if !body_done || !io.buf.is_empty() {
                linger(io).await;
            }
            return Ok(Ended::Closed);
        }
        settings = Settings::of(client);
        deadline = Instant::now() + settings.header_read_timeout;
    }
}

/// The limits one request is read and answered under: the gateway's
/// current ones when the connection starts waiting for its head.
struct Settings {
    max_head: usize,
    header_read_timeout: Duration,
    idle: Duration,
}

impl Settings {
    fn of(client: &Client) -> Self {
        let config = client.gateway.config();
        Self {
            max_head: config.limits.max_header_bytes as usize,
            header_read_timeout: config.limits.header_read_timeout,
            idle: config.proxy.idle_timeout,
        }
    }
}

/// Where the connection is while the stack handles a request.
enum Loan {
    /// The whole body came with the head: the connection stayed here.
    Kept(ClientIo),
    /// Lent to the request's body.
    Lent(incoming::Loan),
}

/// The request of `head`, with its body: taken off the read buffer when
/// it is all there, else read from the connection as it is pulled.
fn request(head: RequestHead, mut io: ClientIo) -> (Request<Body>, Loan) {
    let RequestHead {
        method,
        uri,
        version,
        headers,
        body: length,
        expect_continue,
        ..
    } = head;
    let (body, loan) = match length {
        BodyLength::Length(0) => (body::empty(), Loan::Kept(io)),
        BodyLength::Length(n) if n <= io.buf.len() as u64 => {
            let data = io.buf.split_to(n as usize).freeze();
            (body::full(data), Loan::Kept(io))
        }
        length => {
            let (body, loan) = incoming::lend(io, Decoder::new(length), expect_continue);
            (body::boxed(body), Loan::Lent(loan))
        }
    };
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    (request, loan)
}

/// Answers a request the codec refused (431 or 400), then closes.
async fn refuse(io: ClientIo, refusal: HeadError, out: &mut Vec<u8>, idle: Duration) {
    let error = match refusal {
        HeadError::TooLarge => GatewayError::new(
            ErrorCode::HeadersTooLarge,
            "the request head is larger than max_header_bytes",
        ),
        HeadError::Invalid(why) => GatewayError::new(ErrorCode::BadRequest, why),
    };
    tracing::debug!(error = %error, "request refused");
    let answering = Answering {
        head: false,
        version: http::Version::HTTP_11,
        keep_alive: false,
    };
    let ClientIo { stream, buf } = io;
    if let Ok((stream, _)) =
        write_response(stream, error.into_response(), answering, out, idle).await
    {
        linger(ClientIo { stream, buf }).await;
    }
}

/// Closes the connection gracefully: whatever the client still sends is
/// read and dropped for a moment, so that the close does not reset the
/// connection before the client has read the answer. The sending side is
/// already shut: `write_response` did it right behind the answer, which
/// told it the connection closes.
async fn linger(mut io: ClientIo) {
    let drain = async {
        let mut dropped = 0usize;
        loop {
            io.buf.clear();
            match io.stream.read_buf(&mut io.buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => dropped += n,
            }
            if dropped > 1 << 20 {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Writes `response`; gives the stream back with whether it may carry
/// another request. A body that fails or ends short of its length after
/// the head went out fails the connection, since the message cannot be
/// completed; a body that fails before anything was written is answered
/// as the instance's broken response (502). Waiting for the body, and
/// waiting for the client to take it, are each bounded by `idle`. Large
/// body chunks ready one after the other go out together, uncopied, in
/// one vectored write; an answer that is whole once its body has ended
/// goes out at the end of the turn with the turn's other writes, its large
/// chunks uncopied too ([`crate::write_batch`]).
async fn write_response(
    mut stream: Socket,
    response: Response<Body>,
    answering: Answering,
    out: &mut Vec<u8>,
    idle: Duration,
) -> Result<(Socket, bool), BoxError> {
    let (mut parts, mut body) = response.into_parts();
    let mut size = body.size_hint().exact();
    // Whatever the body has ready goes out with the head, in one write;
    // and a body broken from its first byte can still be answered for.
    let mut ready = poll_ready_frame(&mut body).await;
    if let Poll::Ready(Some(Err(e))) = &ready {
        tracing::debug!(error = %e, "the response body failed before its first byte");
        let broken = GatewayError::new(
            ErrorCode::UpstreamError,
            "the instance sent a broken response body",
        )
        .into_response();
        (parts, body) = broken.into_parts();
        size = body.size_hint().exact();
        ready = Poll::Pending;
    }
    out.clear();
    let (mut encoder, keep_alive) =
        encode::response_head(out, parts.status, &parts.headers, size, answering);
    // Large chunks ready one after the other, kept as they are, each with
    // where in `out` it goes: they go out together with what is copied
    // around them in one vectored write.
    let mut chunks = Pieces::new();
    let mut streamed = false;
    if let Encoder::Length(length) = encoder
        && length >= crate::splice::SPLICE_MIN
        && let Some(handoff) = parts.extensions.remove::<Handoff>()
    {
        return write_lent(stream, body, ready, encoder, handoff, out, idle, keep_alive).await;
    }
    if encoder.has_body() {
        loop {
            let frame = match std::mem::replace(&mut ready, Poll::Pending) {
                Poll::Ready(frame) => frame,
                Poll::Pending => match poll_ready_frame(&mut body).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        // Nothing more ready: send what is gathered, and wait.
                        flush(&mut stream, out, &mut chunks, idle).await?;
                        streamed = true;
                        tokio::time::timeout(idle, body.frame())
                            .await
                            .map_err(|_| "the response body made no progress for idle_timeout")?
                    }
                },
            };
            let data = match frame {
                None => break,
                Some(frame) => match frame?.into_data() {
                    Ok(data) => data,
                    // Trailers are not forwarded.
                    Err(_) => continue,
                },
            };
            if data.is_empty() {
                continue;
            }
            encoder.before_data(out, data.len())?;
            if data.len() >= PIECE_MIN {
                chunks.push(out.len(), data);
            } else {
                out.extend_from_slice(&data);
            }
            encoder.after_data(out);
            if out.len() >= FLUSH_AT || chunks.is_full() || chunks.size() + out.len() >= GATHER_MAX
            {
                flush(&mut stream, out, &mut chunks, idle).await?;
                streamed = true;
            }
        }
        encoder.finish(out)?;
    }
    if streamed {
        // An answer already partly out ends now: the batch is for answers
        // whole in one write.
        flush(&mut stream, out, &mut chunks, idle).await?;
        shrink_out(out);
        if !keep_alive {
            crate::write_batch::shut_down(&stream);
        }
        return Ok((stream, keep_alive));
    }
    // The rest goes out at the end of the turn, with the turn's other
    // writes; on a connection that closes after it, its end right behind.
    let write = Gathered {
        buf: std::mem::take(out),
        pieces: chunks,
    };
    let then = if keep_alive {
        Then::More
    } else {
        Then::Shutdown
    };
    let (stream, written, result) = crate::write_batch::write_all(stream, write, idle, then).await;
    *out = written.buf;
    shrink_out(out);
    result?;
    Ok((stream, keep_alive))
}

/// Writes an answer whose body moves its bytes to the socket itself
/// ([`crate::splice`]): the head, with what the body had ready, is lent
/// to the body along with the socket, and every frame the body yields
/// then stands for bytes it delivered. The length is checked as for any
/// other answer; the socket comes back at the body's end.
#[allow(clippy::too_many_arguments)]
async fn write_lent(
    stream: Socket,
    mut body: Body,
    ready: Poll<Option<Result<Frame<Bytes>, BoxError>>>,
    mut encoder: Encoder,
    handoff: Handoff,
    out: &mut Vec<u8>,
    idle: Duration,
    keep_alive: bool,
) -> Result<(Socket, bool), BoxError> {
    if let Poll::Ready(Some(frame)) = ready
        && let Ok(data) = frame?.into_data()
    {
        encoder.before_data(out, data.len())?;
        out.extend_from_slice(&data);
    }
    handoff.lend(stream, std::mem::take(out));
    while let Some(frame) = tokio::time::timeout(idle, body.frame())
        .await
        .map_err(|_| "the response body made no progress for idle_timeout")?
    {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if !crate::splice::is_delivered(&data) {
            return Err("a body lent the socket yielded bytes it did not deliver".into());
        }
        encoder.before_data(out, data.len())?;
    }
    encoder.finish(out)?;
    let (stream, head) = handoff
        .take_back()
        .ok_or("the body did not give the socket back")?;
    *out = head;
    out.clear();
    shrink_out(out);
    if !keep_alive {
        crate::write_batch::shut_down(&stream);
    }
    Ok((stream, keep_alive))
}

/// A kept-alive connection waits for its next request holding no more
/// write buffer than a small answer's worth.
fn shrink_out(out: &mut Vec<u8>) {
    if out.capacity() > KEEP_OUT {
        *out = Vec::with_capacity(KEEP_OUT);
    }
}

/// The body's next frame if it is ready now.
async fn poll_ready_frame(body: &mut Body) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
}

/// Writes `out` and the chunks placed in it now, and clears both.
async fn flush(
    stream: &mut Socket,
    out: &mut Vec<u8>,
    chunks: &mut Pieces,
    idle: Duration,
) -> Result<(), BoxError> {
    write_now(stream, out, chunks, 0, idle).await?;
    out.clear();
    // The chunks' buffers go back for the next reads.
    chunks.clear();
    Ok(())
}
