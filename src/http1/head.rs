//! Message heads: what a request head means to the gateway's server, and
//! what a response head means to its client (RFC 9112 §2–§6).
//!
//! Both are parsed by `httparse` and judged by the same framing rules:
//!
//! - `Content-Length` is 1 to 18 digits, nothing else: no sign, no
//!   spaces inside, no list (RFC 9110 §8.6). Repeated fields must agree.
//!   Rust's own integer parsing accepts a leading `+`, which is why the
//!   rule is written out here rather than left to `parse`.
//! - A request's `Transfer-Encoding` must be exactly `chunked`, on an
//!   HTTP/1.1 request without `Content-Length`; anything else is refused
//!   (RFC 9112 §6.1, §6.3: a request with both is the classic smuggling
//!   vector). A response's `Transfer-Encoding` wins over its
//!   `Content-Length`; one whose last coding is not `chunked` runs until
//!   the connection closes.
//! - An HTTP/1.1 request carries exactly one valid `Host` (RFC 9112 §3.2).
//!
//! Field values are kept as slices of the head's bytes, not copied.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

use super::hop::ConnectionOptions;

/// Header fields a head may have; more is answered as too large.
pub const MAX_HEADERS: usize = 128;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Larger than allowed (431 for a request).
    TooLarge,
    /// Malformed, or framed in a way that is refused (400 for a request,
    /// a broken response for the client side); says why.
    Invalid(&'static str),
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge => f.write_str("the message head is too large"),
            Self::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for HeadError {}

/// A request head as the gateway's server reads it.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    /// Every field as received, hop-by-hop ones included: routing and
    /// forwarding decide what to pass on.
    pub headers: HeaderMap,
    /// `Length` or `Chunked`.
    pub body: BodyLength,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request.
    pub expect_continue: bool,
}

/// A response head as the gateway's client reads it from an instance.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// The end-to-end fields: hop-by-hop ones (and those `Connection`
    /// names) are taken out, and `Content-Length` too when
    /// `Transfer-Encoding` framed the body.
    pub headers: HeaderMap,
    /// `Length(0)` when the response has no body (`HEAD`, 1xx, 204, 304).
    pub body: BodyLength,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// A `Content-Length` value: 1 to 18 ASCII digits, nothing else. (18
/// digits stay below `u64::MAX` and any body anyone sends.)
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        value
            .iter()
            .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0')),
    )
}

/// Takes one more `Content-Length` field into `length`: repeated fields
/// must carry the same value.
fn add_length(length: &mut Option<u64>, value: &[u8]) -> Result<(), HeadError> {
    let n = content_length(value).ok_or(HeadError::Invalid("invalid Content-Length"))?;
    match *length {
        Some(first) if first != n => Err(HeadError::Invalid("conflicting Content-Length values")),
        _ => {
            *length = Some(n);
            Ok(())
        }
    }
}

/// What the `Transfer-Encoding` fields of a message list: whether the
/// last coding is `chunked`, how many codings there are, and whether any
/// list element was empty.
#[derive(Debug, Default, Clone, Copy)]
struct Codings {
    count: usize,
    last_chunked: bool,
    chunked_before_last: bool,
    /// An empty element (`chunked,`, an empty field): RFC 9110 §5.6.1 lets
    /// a recipient skip it, but other parsers refuse it or read the last
    /// element only, so a request that has one is refused.
    empty: bool,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        for coding in value.split(|&b| b == b',').map(trim_whitespace) {
            if coding.is_empty() {
                self.empty = true;
                continue;
            }
            self.chunked_before_last |= self.last_chunked;
            self.last_chunked = coding.eq_ignore_ascii_case(b"chunked");
            self.count += 1;
        }
    }
}

/// `bytes` without the spaces and tabs around it (RFC 9110 §5.6.3's OWS;
/// not the other ASCII whitespace Rust's `trim_ascii` takes).
pub fn trim_whitespace(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// A request head from the front of `buf`, taken off it; `None` until
/// the head is complete. Heads over `max_head` bytes are too large.
pub fn parse_request(
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<RequestHead>, HeadError> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() <= max_head => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Invalid("malformed request head")),
    };
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(HeadError::Invalid("unsupported HTTP version")),
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Invalid("invalid method"))?;
    let target = parsed.path.unwrap_or_default();

    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| s.as_ptr() as usize - base;
    let target_range = offset(target.as_bytes())..offset(target.as_bytes()) + target.len();
    let mut names = scratch();
    let mut length = None;
    let mut codings: Option<Codings> = None;
    let mut hosts = 0;
    let mut connection = ConnectionOptions::default();
    let mut expect_continue = false;
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Invalid("invalid header name"))?;
        if name == header::CONTENT_LENGTH {
            add_length(&mut length, field.value)?;
        } else if name == header::TRANSFER_ENCODING {
            codings.get_or_insert_default().add(field.value);
        } else if name == header::HOST {
            hosts += 1;
            if !valid_host(field.value) {
                return Err(HeadError::Invalid("invalid Host"));
            }
        } else if name == header::CONNECTION {
            connection.add(field.value);
        } else if name == header::EXPECT {
            expect_continue |= trim_whitespace(field.value).eq_ignore_ascii_case(b"100-continue");
        }
        let start = offset(field.value);
        names.push((name, start..start + field.value.len()));
    }
    if version == Version::HTTP_11 && hosts != 1 || hosts > 1 {
        return Err(HeadError::Invalid(
            "an HTTP/1.1 request needs exactly one Host",
        ));
    }
    let body = match (codings, length) {
        (None, length) => BodyLength::Length(length.unwrap_or(0)),
        (Some(_), Some(_)) => {
            return Err(HeadError::Invalid(
                "the request has both Content-Length and Transfer-Encoding",
            ));
        }
        (Some(_), None) if version == Version::HTTP_10 => {
            return Err(HeadError::Invalid(
                "Transfer-Encoding on an HTTP/1.0 request",
            ));
        }
        (Some(c), None) if c.count == 1 && c.last_chunked && !c.empty => BodyLength::Chunked,
        (Some(_), None) => {
            return Err(HeadError::Invalid(
                "unsupported Transfer-Encoding (only chunked is accepted)",
            ));
        }
    };

    let head = buf.split_to(len).freeze();
    let headers = header_map(&head, &mut names)?;
    let uri = Uri::from_maybe_shared(head.slice(target_range))
        .map_err(|_| HeadError::Invalid("invalid request target"))?;
    let keep_alive = !connection.close && (version == Version::HTTP_11 || connection.keep_alive);
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        body,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
    }))
}

/// A `Host` value: empty, or an authority without user information
/// (RFC 9112 §3.2, RFC 9110 §7.2).
fn valid_host(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    // host [ ":" port ], host an IP literal in brackets or a reg-name /
    // IPv4 address (RFC 3986 §3.2.2): written out, as it runs on every
    // request.
    let (host, port) = if value[0] == b'[' {
        let Some(end) = memchr::memchr(b']', value) else {
            return false;
        };
        let literal = &value[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match &value[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&value[..=end], port),
            _ => return false,
        }
    } else {
        match memchr::memchr(b':', value) {
            Some(colon) => (&value[..colon], &value[colon + 1..]),
            None => (value, &[][..]),
        }
    };
    let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b);
    !host.is_empty()
        && (host[0] == b'[' || host.iter().all(reg_name))
        && port.iter().all(u8::is_ascii_digit)
}

/// Where each field of a head being read sits: its name, and its value's
/// place in the head's bytes.
type Fields = Vec<(HeaderName, std::ops::Range<usize>)>;

thread_local! {
    /// The list of fields of the head being read, kept from one head to
    /// the next so that reading one allocates nothing for it.
    static SCRATCH: std::cell::Cell<Fields> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's field list, empty; given back when dropped.
fn scratch() -> Scratch {
    Scratch(SCRATCH.take())
}

struct Scratch(Fields);

impl std::ops::Deref for Scratch {
    type Target = Fields;
    fn deref(&self) -> &Fields {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Fields {
        &mut self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut fields = std::mem::take(&mut self.0);
        fields.clear();
        SCRATCH.set(fields);
    }
}

/// The fields named in `names`, their values sliced out of `head`.
fn header_map(head: &Bytes, names: &mut Fields) -> Result<HeaderMap, HeadError> {
    // Room for the fields the stack adds (an `X-Request-Id`), so that
    // adding one never grows the map.
    let mut headers = HeaderMap::with_capacity(names.len() + 2);
    for (name, range) in names.drain(..) {
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| HeadError::Invalid("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// A final (non-1xx) response head from the front of `buf`, taken off it
/// with any interim 1xx heads before it; `None` until it is complete.
/// `head_request`: the response answers a `HEAD`, so it has no body.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
    max_head: usize,
) -> Result<Option<ResponseHead>, HeadError> {
    loop {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let parsing = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        );
        let len = match parsing {
            Ok(httparse::Status::Complete(len)) if len <= max_head => len,
            Ok(httparse::Status::Partial) if buf.len() <= max_head => return Ok(None),
            Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Invalid("malformed response head")),
        };
        let code = parsed.code.unwrap_or_default();
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(HeadError::Invalid(
                    "the instance switched protocols; upgrades are not proxied",
                ));
            }
            let _ = buf.split_to(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| HeadError::Invalid("invalid status code"))?;
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let base = buf.as_ptr() as usize;
        // 1xx and 204 never carry a length (RFC 9110 §8.6): one that does
        // is not passed on.
        let lengthless = status == StatusCode::NO_CONTENT;
        let mut connection = ConnectionOptions::default();
        let mut length = None;
        let mut codings: Option<Codings> = None;
        let mut names = scratch();
        for field in parsed.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| HeadError::Invalid("invalid header name"))?;
            if name == header::CONTENT_LENGTH {
                // Kept once: the client gets the length the body is read by.
                let first = length.is_none();
                add_length(&mut length, field.value)?;
                if !first || lengthless {
                    continue;
                }
            } else if name == header::TRANSFER_ENCODING {
                codings.get_or_insert_default().add(field.value);
                continue;
            } else if name == header::CONNECTION {
                connection.add(field.value);
                continue;
            } else if super::hop::is_hop_by_hop(&name) {
                continue;
            }
            let start = field.value.as_ptr() as usize - base;
            names.push((name, start..start + field.value.len()));
        }
        if !connection.listed.is_empty() {
            names.retain(|(name, _)| !connection.listed.contains(name));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = header_map(&head, &mut names)?;
        let mut keep_alive =
            !connection.close && (version == Version::HTTP_11 || connection.keep_alive);
        let body = if head_request || crate::body::status_has_no_body(status) {
            BodyLength::Length(0)
        } else if let Some(codings) = codings {
            // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3);
            // a message with both is not to be trusted with another one.
            if length.is_some() {
                headers.remove(header::CONTENT_LENGTH);
                keep_alive = false;
            }
            if codings.last_chunked && !codings.chunked_before_last {
                BodyLength::Chunked
            } else {
                keep_alive = false;
                BodyLength::UntilClose
            }
        } else if let Some(length) = length {
            BodyLength::Length(length)
        } else {
            keep_alive = false;
            BodyLength::UntilClose
        };
        return Ok(Some(ResponseHead {
            status,
            version,
            headers,
            body,
            keep_alive,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 65536;

    fn request(bytes: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(bytes), MAX)
    }

    fn invalid(bytes: &[u8]) {
        let result = request(bytes);
        assert!(
            matches!(result, Err(HeadError::Invalid(_))),
            "{:?}: {result:?}",
            String::from_utf8_lossy(bytes)
        );
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"000123"), Some(123));
        assert_eq!(
            content_length(b"999999999999999999"),
            Some(999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"+5",
            b"-5",
            b" 5",
            b"5 ",
            b"5,5",
            b"0x5",
            b"5.0",
            b"18446744073709551615",
            b"1000000000000000000",
        ] {
            assert_eq!(
                content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_request_head_is_taken_with_its_framing() {
        let mut buf = BytesMut::from(
            &b"POST /call/svc/a?b=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhelloGET"[..],
        );
        let head = parse_request(&mut buf, MAX).unwrap().unwrap();
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri, "/call/svc/a?b=1");
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["host"], "gw");
        assert_eq!(head.body, BodyLength::Length(5));
        assert!(head.keep_alive && !head.expect_continue);
        assert_eq!(&buf[..], b"helloGET", "the body and what follows stay");

        let head = request(b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.keep_alive);
        assert_eq!(head.body, BodyLength::Length(0));
        let head = request(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!head.keep_alive, "HTTP/1.0 closes unless asked not to");
        let head = request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.keep_alive);
        let head = request(
            b"PUT /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.body, BodyLength::Chunked);
        assert!(head.expect_continue);
        // Bare LF line endings are read as httparse reads them.
        let head = request(b"\r\nGET /healthz HTTP/1.1\nHost: gw\n\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.uri, "/healthz");
        assert!(request(b"GET / HTTP/1.1\r\nHost: g").unwrap().is_none());
    }

    #[test]
    fn refused_framing() {
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\nHost: g\nContent-Length: 5\nTransfer-Encoding: chunked\n\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: xchunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked,\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: , chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding:\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: \x0cchunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 18446744073709551615\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [g::1]\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\nHost: a\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            invalid(bad);
        }
        // Repeated equal lengths are one length.
        let head = request(
            b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.body, BodyLength::Length(3));
        // HTTP/1.0 needs no Host.
        assert!(request(b"GET / HTTP/1.0\r\n\r\n").unwrap().is_some());
        assert!(
            request(b"GET / HTTP/1.1\r\nHost:\r\n\r\n")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn too_large_heads() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(200)
        );
        assert_eq!(
            parse_request(&mut BytesMut::from(big.as_bytes()), 100).unwrap_err(),
            HeadError::TooLarge
        );
        let partial = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(200));
        assert_eq!(
            parse_request(&mut BytesMut::from(partial.as_bytes()), 100).unwrap_err(),
            HeadError::TooLarge
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: 1\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        assert_eq!(request(many.as_bytes()).unwrap_err(), HeadError::TooLarge);
    }

    fn response(bytes: &[u8], head_request: bool) -> Result<ResponseHead, HeadError> {
        let mut buf = BytesMut::from(bytes);
        let head = parse_response(&mut buf, head_request, MAX)?.expect("a whole head");
        Ok(head)
    }

    fn framing(bytes: &str) -> Result<(BodyLength, bool), HeadError> {
        response(bytes.as_bytes(), false).map(|h| (h.body, h.keep_alive))
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        use BodyLength::*;
        let ok = |s: &str| framing(s).unwrap();
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), true)
        );
        assert_eq!(ok("HTTP/1.1 204 No Content\r\n\r\n"), (Length(0), true));
        let no_content = response(
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(
            no_content.unwrap().headers.is_empty(),
            "a 204's length is not passed on"
        );
        assert_eq!(
            ok("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            (Length(0), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            (Chunked, true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"),
            (Chunked, false),
            "both: chunked wins, and the connection is not reused"
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            (UntilClose, false)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            (UntilClose, false)
        );
        assert_eq!(ok("HTTP/1.1 200 OK\r\n\r\n"), (UntilClose, false));
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"),
            (Length(5), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), false)
        );
        assert_eq!(
            ok("HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n"),
            (Length(5), true)
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            (Length(5), true)
        );
        assert_eq!(
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
                .unwrap()
                .body,
            Length(0),
            "an answer to HEAD has no body"
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n",
        ] {
            assert!(framing(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interim_responses_are_skipped() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"[..],
        );
        let head = parse_response(&mut buf, false, MAX).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(&buf[..], b"hi");
        let mut partial = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"[..]);
        assert!(parse_response(&mut partial, false, MAX).unwrap().is_none());
    }

    #[test]
    fn hop_by_hop_response_fields_are_not_passed_on() {
        let head = response(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTrailer: x-checksum\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\nUpgrade: h2c\r\nServer: nginx\r\nContent-Type: text/plain\r\n\r\n",
            false,
        )
        .unwrap();
        let mut names: Vec<_> = head.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "server"]);
        let head = response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(head.headers.get_all("content-length").iter().count(), 1);
    }
}
