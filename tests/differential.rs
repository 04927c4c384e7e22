//! Differential tests of the HTTP/1 codec (`switchyard::http1`) against
//! other parsers, on generated and mutated requests.
//!
//! What matters is where a request ends. If the codec accepts a message
//! and another parser ends it at a different byte, the bytes one calls
//! the next request the other calls body: request smuggling. So every
//! generated message is followed by a plain sentinel request and fed to
//! the codec the way the gateway's server uses it (head, body to `Done`,
//! next head from what is left), and to:
//!
//! - hyper's HTTP/1 server, over an in-memory stream, with a service that
//!   reads each body whole. Whenever the codec accepts a request, hyper
//!   must have served the same request with the same body, and the two
//!   must go on to the same next request (the sentinel, for messages
//!   generated whole). Where the codec refuses, nothing is asserted about
//!   hyper: refusing is always safe. One test holds the codec to all of
//!   that; another only to the boundaries of the requests both accept,
//!   the smuggling property itself, which stays checked on every run
//!   whatever the first finds.
//! - `httparse`, for many more cases: every head the codec accepts ends
//!   where `httparse` says it ends.
//!
//! Also in every case: the codec reads the input the same way whether it
//! arrives whole or in small pieces.
//!
//! Failures are saved in `proptest-regressions/differential.txt` and
//! replayed first on the next run.
//!
//! The generators cover what smuggling attempts use: `Content-Length` and
//! `Transfer-Encoding` spellings, lists and repeats, both together, bare
//! CR and LF, obs-fold, spaces before colons, chunk-size lines with signs,
//! `0x`, whitespace, extensions and too many digits, trailers, a missing
//! or doubled `Host`, HTTP/1.0, bodies longer or shorter than declared,
//! and byte-level mutations of all of it.

use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use switchyard::http1::head::{self, MAX_HEADERS};
use switchyard::http1::{Decoded, Decoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What follows every generated message: a request every parser reads the
/// same way, so that where it is found shows where the message ended.
const SENTINEL: &[u8] = b"GET /sentinel HTTP/1.1\r\nHost: s\r\n\r\n";
/// The gateway's default `limits.max_header_bytes`.
const MAX_HEAD: usize = 65_536;

// ---------------------------------------------------------------------------
// What each side made of the bytes.

/// A request as a parser delimited it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    version: Version,
    body: Bytes,
}

/// How the codec's reading of the input ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CodecEnd {
    /// Every byte belonged to a request it accepted.
    Exhausted,
    /// A request without keep-alive: the server closes after it.
    Closed,
    /// The input ended inside a head.
    Incomplete,
    /// A head or body it refused (the server answers 4xx and closes).
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CodecRun {
    requests: Vec<Seen>,
    /// Where each accepted head starts and ends in the input.
    heads: Vec<(usize, usize)>,
    end: CodecEnd,
}

impl CodecRun {
    /// The same requests, and the same kind of end: why a refusal was
    /// made may depend on how much had arrived (a bare CR seen before the
    /// LF it lacks, or after), that it was made may not.
    fn same_reading(&self, other: &CodecRun) -> bool {
        let refused = |end: &CodecEnd| matches!(end, CodecEnd::Refused(_));
        self.requests == other.requests
            && self.heads == other.heads
            && (self.end == other.end || refused(&self.end) && refused(&other.end))
    }
}

/// The input handed over in pieces, as reads from a socket would.
struct Feed<'a> {
    input: &'a [u8],
    pieces: std::slice::Iter<'a, usize>,
    fed: usize,
}

impl Feed<'_> {
    /// Appends the next piece to `buf`; false once all has been fed.
    fn more(&mut self, buf: &mut BytesMut) -> bool {
        let left = self.input.len() - self.fed;
        if left == 0 {
            return false;
        }
        let n = self.pieces.next().map_or(left, |&n| n.clamp(1, left));
        buf.extend_from_slice(&self.input[self.fed..self.fed + n]);
        self.fed += n;
        true
    }
}

/// Reads `input` with the codec the way the gateway's server does (see
/// `src/server/h1.rs`): a head, its body to `Done`, the next head from
/// what is left, until a refusal, a request without keep-alive, or the
/// end of the input. The bytes arrive in `pieces` (the rest at once).
fn codec(input: &[u8], pieces: &[usize]) -> CodecRun {
    let mut feed = Feed {
        input,
        pieces: pieces.iter(),
        fed: 0,
    };
    let mut buf = BytesMut::new();
    let mut run = CodecRun {
        requests: Vec::new(),
        heads: Vec::new(),
        end: CodecEnd::Exhausted,
    };
    loop {
        let start = feed.fed - buf.len();
        let head = loop {
            if !buf.is_empty() {
                match head::parse_request(&mut buf, MAX_HEAD) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(refusal) => {
                        run.end = CodecEnd::Refused(format!("head: {refusal}"));
                        return run;
                    }
                }
            }
            if !feed.more(&mut buf) {
                if !buf.is_empty() {
                    run.end = CodecEnd::Incomplete;
                }
                return run;
            }
        };
        run.heads.push((start, feed.fed - buf.len()));
        let mut decoder = Decoder::new(head.body);
        let mut body = BytesMut::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(data)) => body.extend_from_slice(&data),
                Ok(Decoded::Done) => break,
                Ok(Decoded::NeedMore) => {
                    if !feed.more(&mut buf) {
                        if let Err(e) = decoder.end_of_input() {
                            run.end = CodecEnd::Refused(format!("body: {e}"));
                            return run;
                        }
                        break;
                    }
                }
                Err(e) => {
                    run.end = CodecEnd::Refused(format!("body: {e}"));
                    return run;
                }
            }
        }
        run.requests.push(Seen {
            method: head.method.to_string(),
            target: head.uri.to_string(),
            version: head.version,
            body: body.freeze(),
        });
        if !head.keep_alive {
            run.end = CodecEnd::Closed;
            return run;
        }
    }
}

/// A request hyper's server handed to the service, and what reading its
/// body gave.
#[derive(Debug, Clone)]
struct Served {
    method: String,
    target: String,
    version: Version,
    body: Result<Bytes, String>,
}

impl Served {
    fn matches(&self, seen: &Seen) -> bool {
        self.method == seen.method
            && self.target == seen.target
            && self.version == seen.version
            && self.body.as_ref() == Ok(&seen.body)
    }
}

/// What hyper's server did with the input.
#[derive(Debug)]
struct HyperRun {
    /// The requests it served, in order.
    served: Vec<Served>,
    /// The status of each response it wrote, 100 Continue included.
    statuses: Vec<u16>,
}

impl HyperRun {
    /// Hyper answered a head with an error of its own (our service answers
    /// 200, or 302 to CONNECT).
    fn refused_a_head(&self) -> bool {
        self.statuses.iter().any(|&status| status >= 400)
    }
}

/// Feeds `input` to hyper's HTTP/1 server over an in-memory stream, closes
/// the write side, and reads everything it answers.
fn hyper(rt: &tokio::runtime::Runtime, input: &[u8]) -> HyperRun {
    let served = Arc::new(Mutex::new(Vec::new()));
    let log = served.clone();
    let service = service_fn(move |request: http::Request<Incoming>| {
        let log = log.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = match body.collect().await {
                Ok(collected) => Ok(collected.to_bytes()),
                // The cause (hyper's own error only says "body").
                Err(e) => Err(match std::error::Error::source(&e) {
                    Some(cause) => format!("{e}: {cause}"),
                    None => e.to_string(),
                }),
            };
            log.lock().unwrap().push(Served {
                method: parts.method.to_string(),
                target: parts.uri.to_string(),
                version: parts.version,
                body,
            });
            // Not 2xx to CONNECT, which hyper would take as a tunnel; and
            // not 4xx, which hyper's own refusals are.
            let status = if parts.method == Method::CONNECT {
                StatusCode::FOUND
            } else {
                StatusCode::OK
            };
            let mut response = Response::new(Empty::<Bytes>::new());
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        }
    });
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let connection = hyper::server::conn::http1::Builder::new()
        // Keep serving what was sent before the client's write side closed.
        .half_close(true)
        // The codec's limit, so that a count of fields is not a difference.
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(server), service);
    let talk = async {
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answers = Vec::new();
        let _ = client.read_to_end(&mut answers).await;
        answers
    };
    let answers = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            let (_, answers) = tokio::join!(connection, talk);
            answers
        })
        .await
        .expect("hyper neither served nor closed the connection")
    });
    // No response has a body: each is a status line and fields.
    let statuses = answers
        .split(|&b| b == b'\n')
        .filter(|line| line.starts_with(b"HTTP/1."))
        .filter_map(|line| std::str::from_utf8(line.get(9..12)?).ok()?.parse().ok())
        .collect();
    HyperRun {
        served: Arc::try_unwrap(served).unwrap().into_inner().unwrap(),
        statuses,
    }
}

// ---------------------------------------------------------------------------
// Generated requests.

/// A line ending.
#[derive(Debug, Clone, Copy)]
enum Eol {
    CrLf,
    Lf,
    Cr,
    Missing,
    CrCrLf,
    SpaceCrLf,
}

impl Eol {
    fn bytes(self) -> &'static [u8] {
        match self {
            Eol::CrLf => b"\r\n",
            Eol::Lf => b"\n",
            Eol::Cr => b"\r",
            Eol::Missing => b"",
            Eol::CrCrLf => b"\r\r\n",
            Eol::SpaceCrLf => b" \r\n",
        }
    }
}

/// Line endings inside a chunked body: mostly right.
fn body_eol() -> impl Strategy<Value = Eol> {
    prop_oneof![
        40 => Just(Eol::CrLf),
        1 => Just(Eol::Lf),
        1 => Just(Eol::Cr),
        1 => Just(Eol::Missing),
        1 => Just(Eol::CrCrLf),
        1 => Just(Eol::SpaceCrLf),
    ]
}

/// How the head's lines end: all CRLF, all bare LF, or each its own.
#[derive(Debug, Clone)]
enum HeadEols {
    CrLf,
    Lf,
    Each(Vec<Eol>),
}

impl HeadEols {
    fn get(&self, line: usize) -> Eol {
        match self {
            HeadEols::CrLf => Eol::CrLf,
            HeadEols::Lf => Eol::Lf,
            HeadEols::Each(eols) => eols[line % eols.len()],
        }
    }
}

fn head_eols() -> impl Strategy<Value = HeadEols> {
    let each = prop_oneof![
        12 => Just(Eol::CrLf),
        2 => Just(Eol::Lf),
        1 => Just(Eol::Cr),
    ];
    prop_oneof![
        16 => Just(HeadEols::CrLf),
        2 => Just(HeadEols::Lf),
        2 => prop::collection::vec(each, 1..12).prop_map(HeadEols::Each),
    ]
}

/// A `Content-Length` value, relative to the body that is sent.
#[derive(Debug, Clone, Copy)]
enum Cl {
    Exact,
    /// The body sent is this much longer than declared (or shorter).
    Off(i8),
    Plus,
    Minus,
    LeadingSpace,
    TrailingSpace,
    LeadingZeros(u8),
    ListSame,
    ListSameSpaced,
    ListDifferent,
    Hex,
    Decimal,
    SpaceInside,
    Empty,
    /// 17 digits: accepted, and more than will ever come.
    Huge,
    /// 19 digits, still a u64.
    Digits19,
    Overflow,
    Underscore,
}

impl Cl {
    fn render(self, sent: usize) -> String {
        let n = sent as i64;
        match self {
            Cl::Exact => n.to_string(),
            Cl::Off(d) => (n - i64::from(d)).max(0).to_string(),
            Cl::Plus => format!("+{n}"),
            Cl::Minus => format!("-{n}"),
            Cl::LeadingSpace => format!(" {n}"),
            Cl::TrailingSpace => format!("{n} \t"),
            Cl::LeadingZeros(k) => format!("{}{n}", "0".repeat(usize::from(k))),
            Cl::ListSame => format!("{n},{n}"),
            Cl::ListSameSpaced => format!("{n}, {n}"),
            Cl::ListDifferent => format!("{n}, {}", n + 1),
            Cl::Hex => format!("0x{n:x}"),
            Cl::Decimal => format!("{n}.0"),
            Cl::SpaceInside => {
                let s = format!("1{n}");
                format!("{} {}", &s[..1], &s[1..])
            }
            Cl::Empty => String::new(),
            Cl::Huge => "99999999999999999".into(),
            Cl::Digits19 => "1000000000000000000".into(),
            Cl::Overflow => "18446744073709551617".into(),
            Cl::Underscore => format!("{n}_"),
        }
    }
}

fn cl() -> impl Strategy<Value = Cl> {
    prop_oneof![
        60 => Just(Cl::Exact),
        4 => prop_oneof![Just(-3i8), Just(-1), Just(1), Just(2), Just(5), Just(40)].prop_map(Cl::Off),
        1 => Just(Cl::Plus),
        1 => Just(Cl::Minus),
        2 => Just(Cl::LeadingSpace),
        2 => Just(Cl::TrailingSpace),
        3 => (1u8..20).prop_map(Cl::LeadingZeros),
        1 => Just(Cl::ListSame),
        1 => Just(Cl::ListSameSpaced),
        1 => Just(Cl::ListDifferent),
        1 => Just(Cl::Hex),
        1 => Just(Cl::Decimal),
        1 => Just(Cl::SpaceInside),
        1 => Just(Cl::Empty),
        1 => Just(Cl::Huge),
        1 => Just(Cl::Digits19),
        1 => Just(Cl::Overflow),
        1 => Just(Cl::Underscore),
    ]
}

/// The spelling of a framing field's name.
#[derive(Debug, Clone, Copy)]
enum Name {
    Canonical,
    Lower,
    Upper,
    /// `Name :` (refused by RFC 9112 §5.1).
    SpaceBeforeColon,
    TabBeforeColon,
    /// Starts with a space: obs-fold of the line before.
    LeadingSpace,
    /// `_` for `-`: another field altogether.
    Underscore,
}

impl Name {
    fn render(self, canonical: &str) -> String {
        match self {
            Name::Canonical => format!("{canonical}:"),
            Name::Lower => format!("{}:", canonical.to_ascii_lowercase()),
            Name::Upper => format!("{}:", canonical.to_ascii_uppercase()),
            Name::SpaceBeforeColon => format!("{canonical} :"),
            Name::TabBeforeColon => format!("{canonical}\t:"),
            Name::LeadingSpace => format!(" {canonical}:"),
            Name::Underscore => format!("{}:", canonical.replace('-', "_")),
        }
    }
}

fn name() -> impl Strategy<Value = Name> {
    prop_oneof![
        50 => Just(Name::Canonical),
        4 => Just(Name::Lower),
        2 => Just(Name::Upper),
        1 => Just(Name::SpaceBeforeColon),
        1 => Just(Name::TabBeforeColon),
        1 => Just(Name::LeadingSpace),
        1 => Just(Name::Underscore),
    ]
}

/// `Transfer-Encoding` values.
const TE_VALUES: &[&str] = &[
    "chunked",
    "Chunked",
    "CHUNKED",
    "chunked, chunked",
    "gzip, chunked",
    "chunked, gzip",
    " chunked",
    "chunked ",
    "\tchunked",
    "xchunked",
    "chunkedx",
    "chun ked",
    "chunked,",
    ",chunked",
    ", chunked ,",
    "chunked;q=1",
    "\"chunked\"",
    "identity",
    "gzip",
    "",
    "chunked\x0b",
    "chunked\x0c",
    "chunked\x7f",
    "ch\u{fc}nked",
];

fn te_value() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        25 => Just("chunked"),
        4 => proptest::sample::select(TE_VALUES),
    ]
}

/// A chunk-size line's size, relative to the data that follows it.
#[derive(Debug, Clone, Copy)]
enum Size {
    Lower,
    Upper,
    /// This many zeros before the digits (past 16 digits: too long).
    LeadingZeros(u8),
    Plus,
    Minus,
    Hex0x,
    LeadingSpace,
    /// Whitespace after the size, nothing after it.
    Trailing(&'static str),
    /// Declares this much more than the data sent (or less).
    Off(i8),
    Max,
    Overflow,
    Underscore,
}

impl Size {
    fn render(self, len: usize) -> String {
        match self {
            Size::Lower => format!("{len:x}"),
            Size::Upper => format!("{len:X}"),
            Size::LeadingZeros(k) => format!("{}{len:x}", "0".repeat(usize::from(k))),
            Size::Plus => format!("+{len:x}"),
            Size::Minus => format!("-{len:x}"),
            Size::Hex0x => format!("0x{len:x}"),
            Size::LeadingSpace => format!(" {len:x}"),
            Size::Trailing(ws) => format!("{len:x}{ws}"),
            Size::Off(d) => format!("{:x}", (len as i64 + i64::from(d)).max(1)),
            Size::Max => "ffffffffffffffff".into(),
            Size::Overflow => "1ffffffffffffffff".into(),
            Size::Underscore => format!("{len:x}_"),
        }
    }
}

fn size() -> impl Strategy<Value = Size> {
    prop_oneof![
        60 => Just(Size::Lower),
        4 => Just(Size::Upper),
        4 => (1u8..20).prop_map(Size::LeadingZeros),
        1 => Just(Size::Plus),
        1 => Just(Size::Minus),
        1 => Just(Size::Hex0x),
        1 => Just(Size::LeadingSpace),
        2 => prop_oneof![Just(" "), Just("\t"), Just("  ")].prop_map(Size::Trailing),
        2 => prop_oneof![Just(-2i8), Just(-1), Just(1), Just(3)].prop_map(Size::Off),
        1 => Just(Size::Max),
        1 => Just(Size::Overflow),
        1 => Just(Size::Underscore),
    ]
}

/// Chunk extensions (and what separates them from the size).
const EXTENSIONS: &[&str] = &[
    ";a",
    ";a=b",
    ";a=\"b;c\\\"d\"",
    "; a = b",
    " ;a",
    "\t;a",
    "  \t ;a=b",
    "\x0c;a",
    "\x0b;a",
    ";a\rb",
    ";a\nb",
    ";\x00",
    ";\x7f\u{ff}",
    ";",
    ";;;",
    "x",
    " x",
];

/// A chunk extension: none mostly, one of [`EXTENSIONS`], or one longer
/// than the codec's limit on a chunk-size line.
fn extension() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => Just(String::new()),
        6 => proptest::sample::select(EXTENSIONS).prop_map(str::to_owned),
        1 => (4000usize..4200).prop_map(|n| format!(";{}", "x".repeat(n))),
    ]
}

#[derive(Debug, Clone)]
struct ChunkLine {
    size: Size,
    extension: String,
    after_size: Eol,
    after_data: Eol,
}

fn chunk_line() -> impl Strategy<Value = ChunkLine> {
    (size(), extension(), body_eol(), body_eol()).prop_map(
        |(size, extension, after_size, after_data)| ChunkLine {
            size,
            extension,
            after_size,
            after_data,
        },
    )
}

/// The last chunk's size.
const LAST_SIZES: &[&str] = &[
    "00",
    "0000000000000000",
    "00000000000000000",
    " 0",
    "0 ",
    "+0",
    "-0",
    "0x0",
    "0\t",
    "",
];

/// Trailer lines.
const TRAILERS: &[&str] = &[
    "X-Trailer: 1",
    "X-Trailer:",
    "Content-Length: 5",
    "Transfer-Encoding: chunked",
    "X-Trailer : 1",
    ": 1",
    "Bad Name: 1",
    "X-Trailer: a\x01b",
    "X-Trailer: \u{ff}",
    " folded",
    "\tfolded: 1",
    "no colon",
    "GET / HTTP/1.1",
];

#[derive(Debug, Clone)]
struct Chunked {
    /// One per chunk; the data is split among them.
    chunks: Vec<ChunkLine>,
    last: &'static str,
    last_extension: String,
    after_last: Eol,
    trailers: Vec<(&'static str, Eol)>,
    end: Eol,
}

fn chunked() -> impl Strategy<Value = Chunked> {
    let last = prop_oneof![
        30 => Just("0"),
        3 => proptest::sample::select(LAST_SIZES),
    ];
    let trailers = prop_oneof![
        10 => Just(Vec::new()),
        3 => prop::collection::vec(
            (
                prop_oneof![
                    3 => Just("X-Trailer: 1"),
                    2 => proptest::sample::select(TRAILERS),
                ],
                body_eol(),
            ),
            1..3,
        ),
    ];
    (
        prop::collection::vec(chunk_line(), 1..4),
        last,
        extension(),
        body_eol(),
        trailers,
        body_eol(),
    )
        .prop_map(
            |(chunks, last, last_extension, after_last, trailers, end)| Chunked {
                chunks,
                last,
                last_extension,
                after_last,
                trailers,
                end,
            },
        )
}

impl Chunked {
    fn encode(&self, data: &[u8], out: &mut Vec<u8>) {
        let n = self.chunks.len().min(data.len());
        for (i, line) in self.chunks[..n].iter().enumerate() {
            let part = &data[i * data.len() / n..(i + 1) * data.len() / n];
            out.extend_from_slice(line.size.render(part.len()).as_bytes());
            out.extend_from_slice(line.extension.as_bytes());
            out.extend_from_slice(line.after_size.bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(line.after_data.bytes());
        }
        out.extend_from_slice(self.last.as_bytes());
        out.extend_from_slice(self.last_extension.as_bytes());
        out.extend_from_slice(self.after_last.bytes());
        for (trailer, eol) in &self.trailers {
            out.extend_from_slice(trailer.as_bytes());
            out.extend_from_slice(eol.bytes());
        }
        out.extend_from_slice(self.end.bytes());
    }
}

/// How the body is delimited.
#[derive(Debug, Clone)]
enum Framing {
    /// No framing field: no body (and what is sent is the next request).
    None,
    ContentLength(Vec<(Name, Cl)>),
    TransferEncoding(Vec<(Name, &'static str)>, Chunked),
    /// Both, in either order.
    Both {
        cl: (Name, Cl),
        te: (Name, &'static str),
        te_first: bool,
        chunked: Chunked,
    },
}

fn framing() -> impl Strategy<Value = Framing> {
    let cls = prop_oneof![
        8 => (name(), cl()).prop_map(|f| vec![f]),
        1 => prop::collection::vec((name(), cl()), 2..4),
        1 => (name(), cl()).prop_map(|f| vec![f, f]),
    ];
    let tes = prop_oneof![
        8 => (name(), te_value()).prop_map(|f| vec![f]),
        1 => prop::collection::vec((name(), te_value()), 2..4),
    ];
    prop_oneof![
        2 => Just(Framing::None),
        5 => cls.prop_map(Framing::ContentLength),
        5 => (tes, chunked()).prop_map(|(tes, chunked)| Framing::TransferEncoding(tes, chunked)),
        1 => ((name(), cl()), (name(), te_value()), any::<bool>(), chunked()).prop_map(
            |(cl, te, te_first, chunked)| Framing::Both {
                cl,
                te,
                te_first,
                chunked
            }
        ),
    ]
}

/// `Host` fields.
const HOSTS: &[&[&str]] = &[
    &[],
    &["h", "h"],
    &["h", "other"],
    &[""],
    &["h:8080"],
    &["u@h"],
    &["h h"],
    &["[::1]:80"],
];

/// Other fields, some of them malformed; `\n` separates lines.
const OTHER_FIELDS: &[&str] = &[
    "Accept: */*",
    "X-Empty:",
    "X-Folded: a\n b",
    "X-Folded: a\n\tb",
    "X-Space : 1",
    "Expect: 100-continue",
    "Connection: close",
    "Connection: keep-alive",
    "Connection: Keep-Alive, x-hop",
    "Transfer_Encoding: chunked",
    "Content_Length: 5",
    "X-Ctl: a\x01b",
    "X-Obs: \u{e9}t\u{e9}",
    "no colon",
    ": empty name",
];

/// What body bytes are mostly made of: letters, digits, line breaks.
const TEXT: &[u8] = b"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz0123456789\r\n\r\n\r\n";

/// Bytes of a body: mostly text, sometimes line breaks, digits and a
/// whole request (what a smuggler hides in a body).
fn body_data() -> impl Strategy<Value = Vec<u8>> {
    let pattern = prop_oneof![
        10 => prop::collection::vec(
            prop_oneof![
                12 => proptest::sample::select(TEXT),
                1 => any::<u8>(),
            ],
            0..24,
        ),
        1 => Just(b"GET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()),
        1 => Just(b"0\r\n\r\n".to_vec()),
    ];
    let len = prop_oneof![
        12 => 0usize..40,
        3 => 40usize..700,
        1 => 8000usize..8400,
    ];
    (pattern, len, any::<bool>()).prop_map(|(pattern, len, exact)| {
        if pattern.is_empty() {
            return Vec::new();
        }
        if exact {
            return pattern;
        }
        pattern.iter().copied().cycle().take(len).collect()
    })
}

/// A request, described.
#[derive(Debug, Clone)]
struct Message {
    method: &'static str,
    target: &'static str,
    version: &'static str,
    hosts: &'static [&'static str],
    connection: Option<&'static str>,
    others: Vec<&'static str>,
    framing: Framing,
    data: Vec<u8>,
    /// Field order: a permutation key.
    order: Vec<u8>,
    eols: HeadEols,
}

fn message() -> impl Strategy<Value = Message> {
    let method = prop_oneof![
        6 => Just("POST"),
        3 => Just("GET"),
        1 => proptest::sample::select(&["PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "get", "X-Custom"][..]),
    ];
    let target = prop_oneof![
        15 => Just("/"),
        1 => proptest::sample::select(&["/p?q=1", "*", "http://h/p", "/a%20b", "/a b", ""][..]),
    ];
    let version = prop_oneof![
        30 => Just("HTTP/1.1"),
        4 => Just("HTTP/1.0"),
        1 => proptest::sample::select(&["HTTP/1.2", "HTTP/2.0", "http/1.1", "HTTP/1.1 ", "HTTP/1"][..]),
    ];
    let hosts = prop_oneof![
        20 => Just(&["h"][..]),
        3 => proptest::sample::select(HOSTS),
    ];
    let connection = prop_oneof![
        6 => Just(None),
        3 => Just(Some("keep-alive")),
        1 => Just(Some("close")),
    ];
    let others = prop_oneof![
        8 => Just(Vec::new()),
        4 => prop::collection::vec(Just("Accept: */*"), 1..2),
        1 => prop::collection::vec(proptest::sample::select(OTHER_FIELDS), 1..3),
    ];
    (
        (method, target, version, hosts, connection, others),
        framing(),
        body_data(),
        prop::collection::vec(any::<u8>(), 8),
        head_eols(),
    )
        .prop_map(
            |((method, target, version, hosts, connection, others), framing, data, order, eols)| {
                Message {
                    method,
                    target,
                    version,
                    hosts,
                    connection,
                    others,
                    framing,
                    data,
                    order,
                    eols,
                }
            },
        )
}

impl Message {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut fields: Vec<String> = Vec::new();
        fields.extend(self.hosts.iter().map(|h| format!("Host: {h}")));
        if let Some(c) = self.connection {
            fields.push(format!("Connection: {c}"));
        }
        fields.extend(self.others.iter().map(|f| f.to_string()));
        // Framing fields go in at places the order key picks.
        let mut framing = Vec::new();
        let sent = match &self.framing {
            Framing::None | Framing::ContentLength(_) => self.data.len(),
            Framing::TransferEncoding(..) | Framing::Both { .. } => 0,
        };
        match &self.framing {
            Framing::None => {}
            Framing::ContentLength(cls) => {
                for (name, cl) in cls {
                    framing.push(format!(
                        "{} {}",
                        name.render("Content-Length"),
                        cl.render(sent)
                    ));
                }
            }
            Framing::TransferEncoding(tes, _) => {
                for (name, te) in tes {
                    framing.push(format!("{} {te}", name.render("Transfer-Encoding")));
                }
            }
            Framing::Both {
                cl,
                te,
                te_first,
                chunked: _,
            } => {
                let (cl_name, cl) = cl;
                let cl = format!(
                    "{} {}",
                    cl_name.render("Content-Length"),
                    // The length of the chunked encoding: a parser that
                    // goes by it reads the whole body too.
                    cl.render(self.chunked_len())
                );
                let te = format!("{} {}", te.0.render("Transfer-Encoding"), te.1);
                if *te_first {
                    framing.extend([te, cl]);
                } else {
                    framing.extend([cl, te]);
                }
            }
        }
        for (i, field) in framing.into_iter().enumerate() {
            let at = usize::from(self.order[i % self.order.len()]) % (fields.len() + 1);
            fields.insert(at, field);
        }

        let mut line = 0;
        let mut push_line = |out: &mut Vec<u8>, text: &str| {
            for (i, part) in text.split('\n').enumerate() {
                if i > 0 {
                    out.extend_from_slice(self.eols.get(line).bytes());
                    line += 1;
                }
                out.extend_from_slice(part.as_bytes());
            }
            out.extend_from_slice(self.eols.get(line).bytes());
            line += 1;
        };
        push_line(
            out,
            &format!("{} {} {}", self.method, self.target, self.version),
        );
        for field in &fields {
            push_line(out, field);
        }
        push_line(out, "");
        match &self.framing {
            Framing::None | Framing::ContentLength(_) => out.extend_from_slice(&self.data),
            Framing::TransferEncoding(_, chunked) | Framing::Both { chunked, .. } => {
                chunked.encode(&self.data, out);
            }
        }
    }

    fn chunked_len(&self) -> usize {
        match &self.framing {
            Framing::TransferEncoding(_, chunked) | Framing::Both { chunked, .. } => {
                let mut body = Vec::new();
                chunked.encode(&self.data, &mut body);
                body.len()
            }
            _ => 0,
        }
    }
}

/// A byte-level change to an encoded message.
#[derive(Debug, Clone)]
enum Mutation {
    Replace(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    FlipBit(Index, u8),
}

/// Bytes that matter to HTTP/1 framing, and any byte.
fn mutation_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => proptest::sample::select(
            &[b'\r', b'\n', b' ', b'\t', b':', b',', b';', b'0', b'1', b'a', b'F', b'+', b'-', 0x00, 0x0b, 0x0c, 0x7f, 0x80][..]
        ),
        1 => any::<u8>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), mutation_byte()).prop_map(|(at, b)| Mutation::Replace(at, b)),
        (any::<Index>(), mutation_byte()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<Index>().prop_map(Mutation::Delete),
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
    ]
}

impl Mutation {
    fn apply(&self, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        match *self {
            Mutation::Replace(at, b) => {
                let at = at.index(bytes.len());
                bytes[at] = b;
            }
            Mutation::Insert(at, b) => bytes.insert(at.index(bytes.len() + 1), b),
            Mutation::Delete(at) => {
                bytes.remove(at.index(bytes.len()));
            }
            Mutation::FlipBit(at, bit) => {
                let at = at.index(bytes.len());
                bytes[at] ^= 1 << bit;
            }
        }
    }
}

/// One test input: messages (mutated, maybe), then the sentinel; and the
/// sizes of the reads the codec gets it in.
#[derive(Clone)]
struct Case {
    messages: Vec<Message>,
    mutations: Vec<Mutation>,
    pieces: Vec<usize>,
    input: Vec<u8>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "input: b\"{}\"", self.input.escape_ascii())?;
        writeln!(f, "pieces: {:?}", self.pieces)?;
        writeln!(f, "mutations: {:?}", self.mutations)?;
        write!(f, "messages, before the mutations: {:#?}", self.messages)
    }
}

fn case() -> impl Strategy<Value = Case> {
    let messages = prop_oneof![
        4 => prop::collection::vec(message(), 1..2),
        1 => prop::collection::vec(message(), 2..3),
    ];
    let mutations = prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::collection::vec(mutation(), 1..4),
    ];
    let pieces = prop_oneof![
        1 => Just(Vec::new()),
        1 => prop::collection::vec(1usize..64, 1..6),
    ];
    (messages, mutations, pieces).prop_map(|(messages, mutations, pieces)| {
        let mut input = Vec::new();
        for message in &messages {
            message.encode(&mut input);
        }
        for mutation in &mutations {
            mutation.apply(&mut input);
        }
        input.extend_from_slice(SENTINEL);
        Case {
            messages,
            mutations,
            pieces,
            input,
        }
    })
}

// ---------------------------------------------------------------------------
// The properties.

/// What the codec made of `input`, checked on its own and against
/// `httparse`: the same reading whatever the reads it arrives in, and
/// every head it accepted ends where `httparse` ends it.
fn check_codec(input: &[u8], pieces: &[usize]) -> Result<CodecRun, TestCaseError> {
    let run = codec(input, &[]);
    let in_pieces = codec(input, pieces);
    prop_assert!(
        in_pieces.same_reading(&run),
        "the codec's reading depends on how the bytes arrive: whole {:?}, in pieces {:?}",
        run,
        in_pieces
    );
    for &(start, end) in &run.heads {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut fields);
        let parsed = request.parse(&input[start..]);
        prop_assert_eq!(
            parsed,
            Ok(httparse::Status::Complete(end - start)),
            "the codec accepted the head at {}..{}; httparse ends it elsewhere or refuses it",
            start,
            end
        );
    }
    Ok(run)
}

/// How far the comparison with hyper goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Strictness {
    /// Hyper serves every request the codec accepts, as the codec read it
    /// (the codec accepts nothing hyper refuses).
    HyperServesAll,
    /// Where hyper serves a request the codec accepted, it read it the same
    /// way; where it refused one, the comparison stops there.
    SameBoundaries,
}

/// Tallies of what each side did with the first request of each case.
#[derive(Default)]
struct Tally {
    cases: AtomicUsize,
    mutated: AtomicUsize,
    codec_accepted: AtomicUsize,
    codec_refused_head: AtomicUsize,
    codec_refused_body: AtomicUsize,
    codec_incomplete: AtomicUsize,
    hyper_accepted: AtomicUsize,
    hyper_body_error: AtomicUsize,
    hyper_refused: AtomicUsize,
    both_accepted: AtomicUsize,
    only_codec_accepted: AtomicUsize,
    only_hyper_accepted: AtomicUsize,
    sentinel_next: AtomicUsize,
}

fn bump(counter: &AtomicUsize) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn get(counter: &AtomicUsize) -> usize {
    counter.load(Ordering::Relaxed)
}

fn percent(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

impl Tally {
    fn count(&self, case: &Case, run: &CodecRun, hyper: &HyperRun) {
        bump(&self.cases);
        if !case.mutations.is_empty() {
            bump(&self.mutated);
        }
        let codec_accepted = !run.requests.is_empty();
        if codec_accepted {
            bump(&self.codec_accepted);
        } else {
            match &run.end {
                CodecEnd::Refused(why) if why.starts_with("head") => {
                    bump(&self.codec_refused_head);
                }
                CodecEnd::Refused(_) => bump(&self.codec_refused_body),
                _ => bump(&self.codec_incomplete),
            }
        }
        let hyper_accepted = match hyper.served.first() {
            Some(served) if served.body.is_ok() => {
                bump(&self.hyper_accepted);
                true
            }
            Some(_) => {
                bump(&self.hyper_body_error);
                false
            }
            None => {
                bump(&self.hyper_refused);
                false
            }
        };
        match (codec_accepted, hyper_accepted) {
            (true, true) => bump(&self.both_accepted),
            (true, false) => bump(&self.only_codec_accepted),
            (false, true) => bump(&self.only_hyper_accepted),
            (false, false) => {}
        }
        if run.requests.get(1).is_some_and(|r| r.target == "/sentinel")
            && hyper.served.get(1).is_some_and(|r| r.target == "/sentinel")
        {
            bump(&self.sentinel_next);
        }
    }

    fn report(&self, test: &str) -> String {
        let n = get(&self.cases);
        format!(
            "{test}: {n} cases ({} mutated)\n  \
             codec: accepted {} ({:.0}%), refused the head {}, refused the body {}, \
             ended inside a head {}\n  \
             hyper: accepted {} ({:.0}%), refused the body {}, refused the head {}\n  \
             both accepted {}, only the codec {}, only hyper {}; \
             both went on to the sentinel {}",
            get(&self.mutated),
            get(&self.codec_accepted),
            percent(get(&self.codec_accepted), n),
            get(&self.codec_refused_head),
            get(&self.codec_refused_body),
            get(&self.codec_incomplete),
            get(&self.hyper_accepted),
            percent(get(&self.hyper_accepted), n),
            get(&self.hyper_body_error),
            get(&self.hyper_refused),
            get(&self.both_accepted),
            get(&self.only_codec_accepted),
            get(&self.only_hyper_accepted),
            get(&self.sentinel_next),
        )
    }
}

/// Compares the codec's reading of an input with what hyper served.
fn compare(run: &CodecRun, hyper: &HyperRun, strictness: Strictness) -> Result<(), TestCaseError> {
    let served = &hyper.served;
    for (i, seen) in run.requests.iter().enumerate() {
        match served.get(i) {
            Some(other) if other.body.is_ok() || strictness == Strictness::HyperServesAll => {
                prop_assert!(
                    other.matches(seen),
                    "request {}: the codec read {:?}; hyper {:?}",
                    i,
                    seen,
                    other
                );
            }
            // Hyper refused this request's body: where it thought the body
            // ended is not known.
            Some(_) => return Ok(()),
            None => {
                prop_assert!(
                    strictness == Strictness::SameBoundaries && hyper.refused_a_head(),
                    "the codec accepted request {} ({:?}); hyper served only {:?} and answered {:?}",
                    i,
                    seen,
                    served,
                    hyper.statuses
                );
                return Ok(());
            }
        }
    }
    if run.end == CodecEnd::Exhausted {
        prop_assert_eq!(
            served.len(),
            run.requests.len(),
            "the codec found no more requests; hyper served {:?}",
            served
        );
    }
    Ok(())
}

/// A runner with `cases`; failures are saved in, and replayed first from,
/// `proptest-regressions/differential.txt`.
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        max_shrink_iters: 2048,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/differential.txt",
        ))),
        ..Config::default()
    })
}

/// Runs `cases` cases against hyper with `strictness`, prints the tally.
fn against_hyper(test: &str, cases: u32, strictness: Strictness) -> Tally {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tally = Tally::default();
    let result = runner(cases).run(&case(), |case| {
        let run = check_codec(&case.input, &case.pieces)?;
        let hyper = hyper(&rt, &case.input);
        tally.count(&case, &run, &hyper);
        compare(&run, &hyper, strictness)
    });
    eprintln!("{}", tally.report(test));
    if let Err(failure) = result {
        panic!("{failure}");
    }
    tally
}

/// The request-smuggling property: wherever both accept a request, the
/// codec and hyper end it at the same byte (same body, same request
/// after it), and where the codec saw no more requests hyper saw none.
/// Also checks that the cases are worth something: both sides accept
/// and refuse plenty of them.
#[test]
fn where_both_accept_codec_and_hyper_end_requests_at_the_same_byte() {
    let tally = against_hyper("where both accept", 6000, Strictness::SameBoundaries);
    let n = get(&tally.cases);
    for (what, count, at_least_percent) in [
        ("the codec accepted", get(&tally.codec_accepted), 25),
        ("the codec refused", n - get(&tally.codec_accepted), 25),
        ("hyper accepted", get(&tally.hyper_accepted), 25),
        ("both accepted", get(&tally.both_accepted), 25),
        (
            "both went on to the sentinel",
            get(&tally.sentinel_next),
            10,
        ),
        ("mutated", get(&tally.mutated), 10),
    ] {
        assert!(
            count * 100 >= n * at_least_percent,
            "{what}: only {count} of {n} cases; the generators need rebalancing"
        );
    }
}

/// The codec accepts nothing hyper's server would not serve the same way:
/// every request the codec accepts, hyper serves, with the same body, and
/// goes on to the same next request.
#[test]
fn hyper_serves_every_request_the_codec_accepts() {
    against_hyper(
        "every request the codec accepts",
        4000,
        Strictness::HyperServesAll,
    );
}

/// Many more cases against `httparse` alone (no hyper): every head the
/// codec accepts ends where `httparse` ends it, whatever the reads.
#[test]
fn codec_heads_end_where_httparse_ends_them() {
    let accepted = AtomicUsize::new(0);
    let result = runner(20_000).run(&case(), |case| {
        let run = check_codec(&case.input, &case.pieces)?;
        if !run.heads.is_empty() {
            bump(&accepted);
        }
        Ok(())
    });
    eprintln!(
        "heads against httparse: the codec accepted the first head of {} cases",
        get(&accepted)
    );
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// Checks `message` followed by the sentinel: what the codec makes of it
/// alone and against `httparse`, and that hyper serves every request the
/// codec accepts, the same way. Returns the codec's reading.
fn check_one(message: &[u8]) -> CodecRun {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut input = message.to_vec();
    input.extend_from_slice(SENTINEL);
    let pieces: Vec<usize> = vec![1; input.len()];
    let run = check_codec(&input, &pieces).unwrap_or_else(|e| panic!("{e}"));
    let hyper = hyper(&rt, &input);
    if let Err(e) = compare(&run, &hyper, Strictness::HyperServesAll) {
        panic!("{}: {e}", input.escape_ascii());
    }
    run
}

/// Classic smuggling attempts: the codec refuses each of them.
#[test]
fn classic_smuggling_attempts_are_refused() {
    for message in [
        // CL.TE and TE.CL.
        &b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX"[..],
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n1\r\nX\r\n0\r\n\r\n",
        // Obfuscated Transfer-Encoding.
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Content-Length spellings.
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\nX",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 1\r\n\r\nX",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nXY",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x1\r\n\r\nX",
        // Chunk framing.
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\nX\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nX\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1 \r\nX\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\nX\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000001\r\nX\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nb\r\nX\r\n0\r\n\r\n",
        // A bare LF ending the trailers: hyper reads on, the sentinel as
        // trailer lines.
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n",
        // Host.
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        let run = check_one(message);
        assert!(
            run.requests.is_empty() && matches!(run.end, CodecEnd::Refused(_)),
            "the codec accepted {}: {run:?}",
            message.escape_ascii()
        );
    }
}

/// Found by the property test: a `Transfer-Encoding` list with empty
/// elements (RFC 9110 §5.6.1 says to ignore them) was chunked to the
/// codec; hyper goes by the last element of the last field, empty here,
/// and answers 400. A parser that neither refuses it nor reads it as
/// chunked reads the chunks as the next request, so the codec refuses it.
#[test]
fn transfer_encoding_with_empty_list_elements() {
    for message in [
        &b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked,\r\n\r\n2\r\nma\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: , chunked ,\r\n\r\n2\r\nma\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n2\r\nma\r\n0\r\n\r\n",
    ] {
        check_one(message);
    }
}

/// Found by the property test: a form feed (0x0C) between a chunk size
/// and `;` was whitespace to the codec (`trim_ascii_start`), while a
/// chunk-size line allows only SP and HTAB there (RFC 9112 §7.1.1, BWS);
/// hyper refuses the body, and so does the codec now.
#[test]
fn form_feed_in_a_chunk_size_line() {
    for message in [
        &b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\x0c;a\r\nma\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2 \x0c ;a\r\nma\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nma\r\n0\x0c;a\r\n\r\n",
    ] {
        check_one(message);
    }
}

/// Found by the property test: trailer lines that are not field lines
/// (RFC 9112 §7.1.2, RFC 9110 §5.1, §5.5) were accepted by the codec,
/// which asked only for a colon and no leading whitespace; hyper parses
/// the trailer section with `httparse` and refuses the body, and the
/// codec now reads each trailer line as a field line.
#[test]
fn trailer_lines_that_are_not_fields() {
    for message in [
        &b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nma\r\n0\r\nBad Name: 1\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nma\r\n0\r\n: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nma\r\n0\r\nX-T : 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nma\r\n0\r\nX-T: a\x01b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nma\r\n0\r\nX-T: a\x7fb\r\n\r\n",
    ] {
        check_one(message);
    }
}
