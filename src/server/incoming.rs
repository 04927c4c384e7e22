//! A request body read straight from the client's connection, as its
//! reader pulls it.
//!
//! While the stack handles a request whose body has not all arrived with
//! its head, the connection (socket and read buffer) is lent to the body:
//! the body decodes it with the codec's [`Decoder`] and, for
//! `Expect: 100-continue`, writes the interim `100 Continue` the first
//! time it is read (so a request refused before its body is read never
//! asks the client to send it). When the stack has answered, the server
//! takes the connection back; a body still held somewhere then fails
//! rather than read the next request's bytes.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWrite;

use crate::body::BoxError;
use crate::http1::{Decoded, Decoder};
use crate::socket::Socket;

/// The interim response a client waiting on `Expect: 100-continue` gets.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// How much the read buffer grows by while a body streams in.
const BODY_READ: usize = 64 * 1024;

/// A client connection: its socket and what has been read and not used.
pub struct ClientIo {
    pub stream: Socket,
    pub buf: BytesMut,
}

/// A connection lent to a request's body.
struct Lent {
    /// `None` once the server took it back.
    io: Option<ClientIo>,
    decoder: Decoder,
    /// Bytes of `100 Continue` still to write; `None` if none is owed.
    interim: Option<usize>,
}

/// The server's hold on a connection it lent to a body.
pub struct Loan(Arc<Mutex<Lent>>);

/// The body of a request, read from the connection lent to it.
pub struct IncomingBody(Arc<Mutex<Lent>>);

/// Lends `io` to the body of a request framed by `decoder`.
pub fn lend(io: ClientIo, decoder: Decoder, expect_continue: bool) -> (IncomingBody, Loan) {
    let lent = Arc::new(Mutex::new(Lent {
        io: Some(io),
        decoder,
        interim: expect_continue.then_some(0),
    }));
    (IncomingBody(lent.clone()), Loan(lent))
}

fn lock(lent: &Mutex<Lent>) -> MutexGuard<'_, Lent> {
    lent.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Loan {
    /// The connection back, and whether the body was read to its end (if
    /// not, what is left of it is still on the connection, and the
    /// connection cannot carry another request).
    pub fn take_back(self) -> Option<(ClientIo, bool)> {
        let mut lent = lock(&self.0);
        let io = lent.io.take()?;
        Some((io, lent.decoder.is_done()))
    }
}

impl http_body::Body for IncomingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut lent = lock(&self.0);
        let Lent {
            io,
            decoder,
            interim,
        } = &mut *lent;
        let Some(io) = io.as_mut() else {
            return Poll::Ready(Some(Err("the request is over".into())));
        };
        if let Some(written) = interim {
            while *written < CONTINUE.len() {
                match ready!(Pin::new(&mut io.stream).poll_write(cx, &CONTINUE[*written..])) {
                    Ok(0) => {
                        return Poll::Ready(Some(Err(
                            io::Error::from(io::ErrorKind::WriteZero).into()
                        )));
                    }
                    Ok(n) => *written += n,
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                }
            }
            *interim = None;
        }
        loop {
            match decoder.decode(&mut io.buf)? {
                Decoded::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Decoded::Done => return Poll::Ready(None),
                Decoded::NeedMore => {
                    if io.buf.capacity() - io.buf.len() < BODY_READ / 4 {
                        io.buf.reserve(BODY_READ);
                    }
                    let read = ready!(tokio_util::io::poll_read_buf(
                        Pin::new(&mut io.stream),
                        cx,
                        &mut io.buf
                    ))?;
                    if read == 0 {
                        decoder.end_of_input()?;
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.0).decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match lock(&self.0).decoder.remaining() {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}
