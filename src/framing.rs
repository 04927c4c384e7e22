//! The framing check hyper leaves to us (SPEC §6).
//!
//! A request carrying both `Content-Length` and `Transfer-Encoding` is the
//! classic request-smuggling vector. hyper parses it safely (the chunked
//! encoding wins, `Content-Length` is dropped, the connection closes after
//! the response) but drops the evidence with it, and the contract wants such
//! a request refused with a 4xx and never forwarded.
//!
//! So the inbound bytes of every connection hyper serves pass through
//! [`Sniffed`] (from the first byte the fast path did not take; a request
//! carrying `Transfer-Encoding` is never the fast path's), which
//! follows the message framing (heads, fixed-length and chunked bodies) just
//! far enough to notice a head that carries both headers, and records its
//! position in a [`FramingLog`] shared with the connection's service. The
//! service counts the requests hyper hands it and refuses the ones the log
//! names. Anything it cannot follow (HTTP/2, a head over the size limit, a
//! body hyper itself will reject) switches the sniffer off: hyper's own
//! parser then has the last word, as before.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which requests of one connection had conflicting framing headers.
#[derive(Debug, Default)]
pub struct FramingLog {
    any: AtomicBool,
    conflicted: Mutex<Vec<u64>>,
}

impl FramingLog {
    /// Whether request number `index` (0-based, in arrival order) carried
    /// both `Content-Length` and `Transfer-Encoding`.
    pub fn conflicted(&self, index: u64) -> bool {
        self.any.load(Ordering::Acquire)
            && self
                .conflicted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&index)
    }

    fn record(&self, index: u64) {
        self.conflicted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(index);
        self.any.store(true, Ordering::Release);
    }
}

/// Where the sniffer is in the inbound byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head (until an empty line).
    Head,
    /// Skipping this many bytes of a fixed-length body.
    Fixed(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines until an empty one.
    Trailers,
    /// Not following this connection any more.
    Off,
}

/// Follows the framing of the requests on one connection.
#[derive(Debug)]
pub struct Sniffer {
    state: State,
    /// The unfinished head or line, when one spans reads.
    pending: Vec<u8>,
    heads: u64,
    max_head: usize,
}

impl Sniffer {
    pub fn new(max_head: usize) -> Self {
        Self {
            state: State::Head,
            pending: Vec::new(),
            heads: 0,
            max_head,
        }
    }

    /// Takes in the next bytes read from the client.
    pub fn feed(&mut self, mut bytes: &[u8], log: &FramingLog) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Fixed(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if left == n {
                        State::Head
                    } else {
                        State::Fixed(left - n)
                    };
                }
                State::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if left == n {
                        State::ChunkSize
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::Head => {
                    if self.pending.is_empty() {
                        // Empty lines before a request line are ignored (RFC 9112 §2.2).
                        let skip = bytes
                            .iter()
                            .take_while(|b| matches!(b, b'\r' | b'\n'))
                            .count();
                        bytes = &bytes[skip..];
                        if bytes.is_empty() {
                            return;
                        }
                        // The usual case: the whole head in this read, read in place.
                        if let Some(end) = memchr::memmem::find(bytes, b"\r\n\r\n") {
                            if end <= self.max_head {
                                self.state = self.on_head(&bytes[..end], log);
                                bytes = &bytes[end + 4..];
                                continue;
                            }
                        }
                    }
                    let Some(end) = self.take_until(&mut bytes, b"\r\n\r\n") else {
                        return;
                    };
                    let head = std::mem::take(&mut self.pending);
                    self.state = self.on_head(&head[..end], log);
                    self.pending = head;
                    self.pending.clear();
                }
                State::ChunkSize => {
                    let Some(end) = self.take_until(&mut bytes, b"\n") else {
                        return;
                    };
                    let line = &self.pending[..end];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let size = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
                    self.state = match size {
                        Some(0) => State::Trailers,
                        // Data, then its CRLF.
                        Some(n) => State::ChunkData(n.saturating_add(2)),
                        None => State::Off,
                    };
                    self.pending.clear();
                }
                State::Trailers => {
                    let Some(end) = self.take_until(&mut bytes, b"\n") else {
                        return;
                    };
                    let line = &self.pending[..end];
                    if line.is_empty() || line == b"\r" {
                        self.state = State::Head;
                    }
                    self.pending.clear();
                }
            }
        }
    }

    /// Moves bytes from `bytes` into `pending` up to and including
    /// `delimiter` (at most 4 bytes); returns the length before it once it
    /// has been seen. Bytes after the delimiter are left in `bytes`, never
    /// copied.
    fn take_until(&mut self, bytes: &mut &[u8], delimiter: &[u8]) -> Option<usize> {
        let d = delimiter.len();
        // A delimiter may straddle what is pending and the new bytes.
        let tail = self.pending.len().min(d - 1);
        let lead = bytes.len().min(d - 1);
        let mut joint = [0u8; 6];
        joint[..tail].copy_from_slice(&self.pending[self.pending.len() - tail..]);
        joint[tail..tail + lead].copy_from_slice(&bytes[..lead]);
        let straddling = joint[..tail + lead]
            .windows(d)
            .position(|w| w == delimiter)
            .map(|p| p + d - tail);
        let after = straddling.or_else(|| memchr::memmem::find(bytes, delimiter).map(|p| p + d));
        match after {
            Some(after) => {
                self.pending.extend_from_slice(&bytes[..after]);
                *bytes = &bytes[after..];
                Some(self.pending.len() - d)
            }
            None if self.pending.len() + bytes.len() > self.max_head => {
                // Too large to be a head hyper accepts: it answers 431.
                self.state = State::Off;
                self.pending = Vec::new();
                *bytes = &[];
                None
            }
            None => {
                self.pending.extend_from_slice(bytes);
                *bytes = &[];
                None
            }
        }
    }

    /// Reads one complete head; returns what follows it.
    fn on_head(&mut self, head: &[u8], log: &FramingLog) -> State {
        let index = self.heads;
        self.heads += 1;
        if head.starts_with(b"PRI * HTTP/2.0") {
            return State::Off;
        }
        let mut length = None;
        let mut chunked = None;
        for line in head.split(|&b| b == b'\n').skip(1) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
            if name.eq_ignore_ascii_case(b"content-length") {
                length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                if length.is_none() {
                    return State::Off;
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                let last = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .map(trim)
                    .unwrap_or_default();
                chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        }
        match (length, chunked) {
            (Some(_), Some(_)) => {
                log.record(index);
                // hyper follows Transfer-Encoding and then closes the connection.
                if chunked == Some(true) {
                    State::ChunkSize
                } else {
                    State::Off
                }
            }
            (_, Some(true)) => State::ChunkSize,
            (_, Some(false)) => State::Off,
            (Some(0) | None, None) => State::Head,
            (Some(n), None) => State::Fixed(n),
        }
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// A client connection whose inbound bytes go through a [`Sniffer`],
/// starting with the bytes the fast path already read from it.
pub struct Sniffed<T> {
    inner: T,
    /// Read before hyper took the connection over: it reads these first.
    read: bytes::Bytes,
    sniffer: Sniffer,
    log: std::sync::Arc<FramingLog>,
}

impl<T> Sniffed<T> {
    pub fn new(
        inner: T,
        read: bytes::Bytes,
        max_head: usize,
        log: std::sync::Arc<FramingLog>,
    ) -> Self {
        Self {
            inner,
            read,
            sniffer: Sniffer::new(max_head),
            log,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniffed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = if this.read.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            Poll::Ready(Ok(()))
        };
        if let Poll::Ready(Ok(())) = polled {
            this.sniffer.feed(&buf.filled()[before..], &this.log);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniffed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` whole and in every two-part split, and returns the
    /// conflicted request indices (the same every time).
    fn conflicts(stream: &[u8]) -> Vec<u64> {
        let run = |parts: &[&[u8]]| {
            let log = FramingLog::default();
            let mut sniffer = Sniffer::new(65536);
            for part in parts {
                sniffer.feed(part, &log);
            }
            log.conflicted.into_inner().unwrap()
        };
        let whole = run(&[stream]);
        for at in 0..stream.len() {
            assert_eq!(run(&[&stream[..at], &stream[at..]]), whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "byte by byte");
        whole
    }

    #[test]
    fn plain_requests_have_no_conflict() {
        let s = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /y HTTP/1.1\r\n\r\n";
        assert_eq!(conflicts(s), Vec::<u64>::new());
    }

    #[test]
    fn both_framing_headers_are_noticed_in_either_order_and_any_case() {
        let s = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(conflicts(s), [0]);
        let s = b"GET / HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(conflicts(s), [1]);
    }

    #[test]
    fn bodies_are_skipped_so_a_head_inside_one_is_not_mistaken() {
        let inner =
            b"GET /smuggled HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut s = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            inner.len()
        )
        .into_bytes();
        s.extend_from_slice(inner);
        s.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
        assert_eq!(conflicts(&s), Vec::<u64>::new());
        let mut chunked = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        chunked.extend_from_slice(format!("{:x};ext=1\r\n", inner.len()).as_bytes());
        chunked.extend_from_slice(inner);
        chunked.extend_from_slice(b"\r\n0\r\nX-Trailer: 1\r\n\r\nGET /n HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(conflicts(&chunked), [1]);
    }

    #[test]
    fn http2_and_oversized_heads_switch_it_off() {
        assert_eq!(
            conflicts(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"),
            Vec::<u64>::new()
        );
        let log = FramingLog::default();
        let mut sniffer = Sniffer::new(64);
        sniffer.feed(&[b'a'; 200], &log);
        assert_eq!(sniffer.state, State::Off);
    }
}
