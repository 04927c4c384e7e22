//! The HTTP/1.1 fast path: the common proxied request, served without
//! hyper's server.
//!
//! Most calls between services are small HTTP/1.1 requests on keep-alive
//! connections: a head and, at most, a short body, arriving in one read.
//! For those, hyper's general machinery (its dispatcher, streaming request
//! body, per-request timer and boxed service future, and the framing
//! sniffer in front of it) cost more than the proxying itself. So every
//! connection starts here, and a request is served here when:
//!
//! - its head parses and says HTTP/1.1, with an origin-form target under
//!   `/call/` and a method other than `CONNECT`;
//! - it has no `Transfer-Encoding`, `Expect` or `Upgrade`, at most one
//!   `Content-Length`, and a `Connection` naming only `keep-alive`/`close`;
//! - its whole body (at most [`MAX_BODY`] bytes) has already been read.
//!
//! The request then goes through the same proxy as any other, and its
//! response is written here. The first request that does not qualify (an
//! API call, HTTP/2, a chunked or large upload, a head over the size limit,
//! anything unusual) hands the connection, with every byte read and not
//! yet served, to hyper for the rest of its life: whatever is not the
//! common case keeps hyper's handling, the framing check included.
//!
//! Timeouts are hyper's: a head must arrive whole within
//! `header_read_timeout` of when the connection started waiting for it
//! (idle keep-alive time included), else the connection is closed.

use std::pin::Pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Client;
use crate::body::{Body, BoxError};
use crate::config::LimitsConfig;
use crate::proxy::headers::{ConnectionOptions, field};
use crate::proxy::path::PREFIX;

/// Request bodies up to this size, already read with their head, are
/// served here; larger ones go to hyper, which streams them.
pub const MAX_BODY: usize = 16 * 1024;
/// Header fields a request may have here; more go to hyper.
const MAX_HEADERS: usize = 100;
/// How much the read buffer grows by.
const READ_CHUNK: usize = 8 * 1024;
/// Response body chunks at least this large are written as they are,
/// rather than copied behind the head.
const WRITE_THROUGH: usize = 4 * 1024;
/// Small chunks ready one after the other are gathered up to this much
/// before they are written.
const FLUSH_AT: usize = 64 * 1024;

/// Serves requests on `stream` while they qualify. `Ok(None)`: the
/// connection is done (closed by the client, timed out, or shutting down).
/// `Ok(Some(..))`: hyper takes over the stream, starting with the bytes
/// read and not served.
pub(super) async fn serve(
    client: &Client,
    mut stream: TcpStream,
    limits: &LimitsConfig,
) -> Result<Option<(TcpStream, BytesMut)>, BoxError> {
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(1024);
    // One timer and one shutdown waiter for the connection's life, not one
    // of each per request: the timer is set for the first head's deadline
    // and, when it fires before the current head's, moved on to it.
    let mut deadline = Instant::now() + limits.header_read_timeout;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline));
    let mut draining = std::pin::pin!(client.draining.cancelled());
    loop {
        let request = loop {
            match parse(&mut read, limits.max_header_bytes as usize) {
                Parsed::Ours(request) => break request,
                Parsed::NotOurs => return Ok(Some((stream, read))),
                Parsed::Partial if read.len() > limits.max_header_bytes as usize => {
                    // hyper answers 431.
                    return Ok(Some((stream, read)));
                }
                Parsed::Partial => {}
            }
            if read.capacity() - read.len() < 1024 {
                read.reserve(READ_CHUNK);
            }
            tokio::select! {
                n = stream.read_buf(&mut read) => if n? == 0 {
                    return Ok(None);
                },
                () = &mut timer => {
                    if timer.deadline() >= deadline {
                        tracing::debug!("request head not read within header_read_timeout");
                        return Ok(None);
                    }
                    timer.as_mut().reset(deadline);
                }
                () = &mut draining, if read.is_empty() => return Ok(None),
            }
        };
        let head_request = request.request.method() == Method::HEAD;
        let response = client
            .gateway
            .proxy()
            .forward(client.gateway.registry(), request.request, &client.peer)
            .await;
        let keep_alive;
        (stream, keep_alive) =
            write_response(stream, response, head_request, request.close, &mut out).await?;
        if !keep_alive || client.draining.is_cancelled() {
            return Ok(None);
        }
        deadline = Instant::now() + limits.header_read_timeout;
    }
}

/// A request taken off the read buffer.
struct Taken {
    request: Request<Full<Bytes>>,
    /// The client asked for the connection to close after the response.
    close: bool,
}

// Returned once per request and never stored: boxing the request would only
// add an allocation.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Ours(Taken),
    /// Not a whole head yet.
    Partial,
    /// For hyper: the buffer is left as it was.
    NotOurs,
}

/// Takes the request at the front of `read` if it is one the fast path
/// serves; leaves the buffer untouched otherwise. Heads over `max_head`
/// bytes are hyper's to refuse (431).
fn parse(read: &mut BytesMut, max_head: usize) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut fields);
    let head_len = match head.parse(read) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        _ => return Parsed::NotOurs,
    };
    let (Some(method), Some(path), Some(1)) = (head.method, head.path, head.version) else {
        return Parsed::NotOurs;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::NotOurs;
    };
    if method == Method::CONNECT || !path.starts_with(PREFIX) {
        return Parsed::NotOurs;
    }
    let mut length = None;
    let mut connection = ConnectionOptions::default();
    // Where each name and value sits in the head, to slice it once frozen.
    let base = read.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let mut names = Vec::with_capacity(head.headers.len());
    for field in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::NotOurs;
        };
        if name == header::TRANSFER_ENCODING || name == header::EXPECT || name == header::UPGRADE {
            return Parsed::NotOurs;
        }
        if name == header::CONTENT_LENGTH {
            match (length, content_length(field.value)) {
                (None, Some(n)) if n <= MAX_BODY => length = Some(n),
                _ => return Parsed::NotOurs,
            }
        } else if name == header::CONNECTION {
            connection.add(field.value);
        }
        let start = offset(field.value);
        names.push((name, start..start + field.value.len()));
    }
    if !connection.listed.is_empty() || connection.unreadable {
        // Other hop-by-hop headers named: hyper's case.
        return Parsed::NotOurs;
    }
    let close = connection.close;
    let path = offset(path.as_bytes())..offset(path.as_bytes()) + path.len();
    let body_len = length.unwrap_or(0);
    if read.len() < head_len + body_len {
        // The rest of the body is on its way: hyper streams it, with the
        // body's idle timeout.
        return Parsed::NotOurs;
    }

    let head = read.split_to(head_len).freeze();
    let body = read.split_to(body_len).freeze();
    let mut headers = HeaderMap::with_capacity(names.len());
    for (name, range) in names {
        match HeaderValue::from_maybe_shared(head.slice(range)) {
            Ok(value) => {
                headers.append(name, value);
            }
            Err(_) => return give_back(read, head, body),
        }
    }
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path)) else {
        return give_back(read, head, body);
    };
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Ours(Taken { request, close })
}

/// Puts a request taken off the buffer back in front of it, for hyper
/// (which will refuse it: a value or target `http` does not accept).
fn give_back(read: &mut BytesMut, head: Bytes, body: Bytes) -> Parsed {
    let mut whole = BytesMut::with_capacity(head.len() + body.len() + read.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(&body);
    whole.extend_from_slice(read);
    *read = whole;
    Parsed::NotOurs
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6).
fn content_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body at all (`HEAD`, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Writes `response`; gives the stream back with whether it may carry
/// another request. A body that fails or ends short of its length closes
/// the connection, since the message cannot be completed. What is left of
/// the response when its body has ended goes out at the end of the turn,
/// with the turn's other writes ([`crate::turn`]).
async fn write_response(
    mut stream: TcpStream,
    response: Response<Body>,
    head_request: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<(TcpStream, bool), BoxError> {
    let (parts, mut body) = response.into_parts();
    out.clear();
    let (framing, close) = encode_head(out, &parts, body.size_hint().exact(), head_request, close);
    let mut written = 0u64;
    if framing != Framing::None {
        loop {
            // Whatever the body has ready goes out with the head, in one write.
            let frame =
                match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)))
                    .await
                {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        stream.write_all(out).await?;
                        out.clear();
                        body.frame().await
                    }
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
            written += data.len() as u64;
            if framing == Framing::Chunked {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            if data.len() >= WRITE_THROUGH {
                stream.write_all(out).await?;
                out.clear();
                stream.write_all(&data).await?;
            } else {
                out.extend_from_slice(&data);
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
            if out.len() >= FLUSH_AT {
                stream.write_all(out).await?;
                out.clear();
            }
        }
        match framing {
            Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
            Framing::Length(length) if written != length => {
                return Err("the response body did not match its length".into());
            }
            _ => {}
        }
    }
    let (stream, written, result) = crate::turn::write_all(stream, std::mem::take(out)).await;
    *out = written;
    result?;
    Ok((stream, !close))
}

/// Writes the status line and header fields, adding `Date` when missing
/// and the framing the body needs; returns that framing and whether the
/// connection closes after this response.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    size: Option<u64>,
    head_request: bool,
    mut close: bool,
) -> (Framing, bool) {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length = None;
    let mut dated = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            length = std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
        } else if *name == header::DATE {
            dated = true;
        } else if *name == header::CONNECTION {
            close |= ConnectionOptions::of(std::iter::once(value)).close;
            continue;
        } else if *name == header::TRANSFER_ENCODING {
            // The framing is this hop's to choose.
            continue;
        }
        field(out, name.as_str(), value.as_bytes());
    }
    if !dated {
        date::field(out);
    }
    let framing = match (length, size) {
        _ if crate::body::status_has_no_body(status) => Framing::None,
        (Some(length), _) => Framing::Length(length),
        (None, Some(size)) => {
            field(
                out,
                "content-length",
                itoa::Buffer::new().format(size).as_bytes(),
            );
            Framing::Length(size)
        }
        (None, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let framing = if head_request { Framing::None } else { framing };
    (framing, close)
}

/// The `Date` of responses made here, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    /// Writes the `Date` header line.
    pub fn field(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != second {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            crate::proxy::headers::field(out, "date", text.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_HEAD: usize = 65536;

    fn take_from(bytes: &[u8]) -> (Parsed, BytesMut) {
        let mut read = BytesMut::from(bytes);
        (parse(&mut read, MAX_HEAD), read)
    }

    /// Asserts `bytes` are left to hyper, untouched.
    fn not_ours(bytes: &[u8]) {
        let (parsed, read) = take_from(bytes);
        assert!(
            matches!(parsed, Parsed::NotOurs),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(&read[..], bytes, "the buffer is left as it was");
    }

    #[test]
    fn common_calls_are_taken_with_their_body_and_the_rest_left() {
        let (parsed, read) = take_from(
            b"POST /call/svc/a?b=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhelloGET /next",
        );
        let Parsed::Ours(taken) = parsed else {
            panic!("not taken");
        };
        assert!(!taken.close);
        let request = taken.request;
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "/call/svc/a?b=1");
        assert_eq!(request.headers()["host"], "gw");
        assert_eq!(request.headers()["content-length"], "5");
        assert_eq!(request.body().size_hint().exact(), Some(5));
        assert_eq!(
            &read[..],
            b"GET /next",
            "a pipelined request waits its turn"
        );

        let (parsed, _) = take_from(b"GET /call/svc HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(matches!(parsed, Parsed::Ours(Taken { close: true, .. })));
    }

    #[test]
    fn partial_heads_wait_for_more() {
        let (parsed, read) = take_from(b"GET /call/svc/a HTTP/1.1\r\nHost: g");
        assert!(matches!(parsed, Parsed::Partial));
        assert_eq!(read.len(), 33);
        assert!(matches!(
            parse(&mut BytesMut::new(), MAX_HEAD),
            Parsed::Partial
        ));
    }

    #[test]
    fn everything_else_is_left_to_hyper() {
        for bytes in [
            &b"GET /services HTTP/1.1\r\n\r\n"[..],
            b"GET /healthz HTTP/1.1\r\n\r\n",
            b"GET /call/svc HTTP/1.0\r\n\r\n",
            b"GET http://h/call/svc HTTP/1.1\r\n\r\n",
            b"CONNECT /call/svc HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"POST /call/svc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /call/svc HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /call/svc HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /call/svc HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
            b"POST /call/svc HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"GET /call/svc HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET /call/svc HTTP/1.1\r\nConnection: keep-alive, X-Hop\r\n\r\n",
            // The body is still on its way.
            b"POST /call/svc HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234",
            b"GET /call/svc HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            not_ours(bytes);
        }
        let large = format!(
            "POST /call/svc HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        not_ours(large.as_bytes());
        let big_head = format!(
            "GET /call/svc HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        not_ours(big_head.as_bytes());
    }

    fn head(response: Response<Body>, head_request: bool, close: bool) -> (String, Framing, bool) {
        let (parts, body) = response.into_parts();
        let mut out = Vec::new();
        let (framing, close) = encode_head(
            &mut out,
            &parts,
            body.size_hint().exact(),
            head_request,
            close,
        );
        (String::from_utf8(out).unwrap(), framing, close)
    }

    #[test]
    fn response_heads_carry_the_framing_their_body_needs() {
        let mut known = Response::new(crate::body::full("hello"));
        known
            .headers_mut()
            .insert("x-a", HeaderValue::from_static("1"));
        let (text, framing, close) = head(known, false, false);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with("GMT\r\ncontent-length: 5\r\n\r\n"), "{text}");
        assert_eq!((framing, close), (Framing::Length(5), false));

        // Mapping frames loses the size: as with a body of unknown length.
        let unknown_size = Full::new(Bytes::from_static(b"hello")).map_frame(|frame| frame);
        let streamed = Response::new(crate::body::boxed(unknown_size));
        let (text, framing, _) = head(streamed, false, false);
        assert!(
            text.ends_with("transfer-encoding: chunked\r\n\r\n"),
            "{text}"
        );
        assert_eq!(framing, Framing::Chunked);

        let mut upstream = Response::new(crate::body::empty());
        *upstream.status_mut() = http::StatusCode::NOT_FOUND;
        upstream
            .headers_mut()
            .insert("content-length", HeaderValue::from_static("9"));
        upstream.headers_mut().insert(
            "date",
            HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"),
        );
        let (text, framing, close) = head(upstream, true, true);
        assert_eq!(
            text,
            "HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\nconnection: close\r\n\r\n"
        );
        assert_eq!((framing, close), (Framing::None, true), "HEAD: no body");

        let mut no_content = Response::new(crate::body::empty());
        *no_content.status_mut() = http::StatusCode::NO_CONTENT;
        let (text, framing, _) = head(no_content, false, false);
        assert!(!text.contains("content-length"), "{text}");
        assert_eq!(framing, Framing::None);
    }
}
