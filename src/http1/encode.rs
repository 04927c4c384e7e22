//! Writing messages: header lines, and the framing a message gets from
//! what is known of its body. One encoder for the requests the gateway
//! sends to instances and the responses it sends to clients.
//!
//! Framing is always this hop's choice (RFC 9112 §6): `Transfer-Encoding`
//! from elsewhere is never copied, a known size becomes `Content-Length`,
//! an unknown one is chunked (or, to an HTTP/1.0 client, delimited by
//! closing the connection).

use http::header::{self, HeaderMap};
use http::{StatusCode, Version};

use super::hop::ConnectionOptions;

/// The end of a chunked body: the last chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Writes one `name: value\r\n` line.
pub fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the size line of a chunk of `len` bytes.
pub fn chunk_size(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = len;
    loop {
        at -= 1;
        digits[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// How a body goes on the wire, and how much of it is still expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoder {
    /// No body at all (`HEAD`, 1xx, 204, 304).
    Bodiless,
    /// Exactly this many bytes still to write.
    Length(u64),
    Chunked,
    /// Everything written until the connection closes.
    UntilClose,
}

/// Why a body could not be written as framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeError(pub &'static str);

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for EncodeError {}

impl Encoder {
    pub fn has_body(&self) -> bool {
        *self != Self::Bodiless
    }

    /// Writes what goes before `len` bytes of data (a chunk's size line);
    /// more data than the length declared is an error.
    pub fn before_data(&mut self, out: &mut Vec<u8>, len: usize) -> Result<(), EncodeError> {
        match self {
            Self::Chunked => chunk_size(out, len),
            Self::Length(left) => {
                *left = left
                    .checked_sub(len as u64)
                    .ok_or(EncodeError("the body is longer than its Content-Length"))?;
            }
            Self::UntilClose => {}
            Self::Bodiless => return Err(EncodeError("this message has no body")),
        }
        Ok(())
    }

    /// Writes what goes after a piece of data (a chunk's CRLF).
    pub fn after_data(&self, out: &mut Vec<u8>) {
        if *self == Self::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Writes the end of the body; a body shorter than its declared length
    /// is an error.
    pub fn finish(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Self::Chunked => out.extend_from_slice(LAST_CHUNK),
            Self::Length(left) if *left > 0 => {
                return Err(EncodeError("the body ended short of its Content-Length"));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Ends a request head with the framing of a body of `size` bytes
/// (`Content-Length` when known, else chunked) and the empty line. An
/// empty body is declared only when `declare_empty`.
pub fn request_framing(out: &mut Vec<u8>, size: Option<u64>, declare_empty: bool) -> Encoder {
    let encoder = match size {
        Some(0) if !declare_empty => Encoder::Bodiless,
        Some(n) => {
            field(
                out,
                "content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
            Encoder::Length(n)
        }
        None => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Encoder::Chunked
        }
    };
    out.extend_from_slice(b"\r\n");
    encoder
}

/// What a response is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answering {
    /// The request was a `HEAD`: the response carries no body.
    pub head: bool,
    pub version: Version,
    /// The connection may carry another request afterwards.
    pub keep_alive: bool,
}

/// Writes a response head: the status line, the fields (but the framing
/// and connection ones), `Date` when missing, the framing the body needs,
/// and `Connection`. `size` is the body's exact size when known. Returns
/// the body's encoder and whether the connection stays open afterwards.
pub fn response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    size: Option<u64>,
    answering: Answering,
) -> (Encoder, bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // 1xx and 204 never carry a length (RFC 9110 §8.6); 304 may, as the
    // length of what a GET would have sent.
    let lengthless = status.is_informational() || status == StatusCode::NO_CONTENT;
    let mut length = None;
    let mut dated = false;
    let mut connection = ConnectionOptions::default();
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            if lengthless || length.is_some() {
                continue;
            }
            length = Some(super::head::content_length(value.as_bytes()));
        } else if *name == header::CONNECTION {
            connection.add(value.as_bytes());
            continue;
        } else if *name == header::TRANSFER_ENCODING {
            continue;
        } else if *name == header::DATE {
            dated = true;
        }
        field(out, name.as_str(), value.as_bytes());
    }
    if !dated {
        super::date::field(out);
    }
    let mut keep_alive = answering.keep_alive && !connection.close;
    let encoder = if crate::body::status_has_no_body(status) {
        Encoder::Bodiless
    } else if answering.head {
        // A HEAD answer has no body: its length is the one the response
        // states, or that of the body the gateway made up for the GET.
        // An instance's answer to HEAD has an empty body, whose size says
        // nothing: no length is invented for it.
        if let (None, Some(size @ 1..)) = (length, size) {
            field(
                out,
                "content-length",
                itoa::Buffer::new().format(size).as_bytes(),
            );
        }
        Encoder::Bodiless
    } else {
        match (length, size) {
            (Some(Some(length)), _) => Encoder::Length(length),
            (Some(None), _) => {
                // Not a length this codec wrote or accepted: the body is
                // sent as it comes and the connection closes after it.
                keep_alive = false;
                Encoder::UntilClose
            }
            (None, Some(size)) => {
                field(
                    out,
                    "content-length",
                    itoa::Buffer::new().format(size).as_bytes(),
                );
                Encoder::Length(size)
            }
            (None, None) if answering.version == Version::HTTP_11 => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Encoder::Chunked
            }
            (None, None) => {
                keep_alive = false;
                Encoder::UntilClose
            }
        }
    };
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if answering.version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (encoder, keep_alive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const KEEP: Answering = Answering {
        head: false,
        version: Version::HTTP_11,
        keep_alive: true,
    };

    fn head(
        status: u16,
        fields: &[(&str, &str)],
        size: Option<u64>,
        answering: Answering,
    ) -> (String, Encoder, bool) {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let mut out = Vec::new();
        let (encoder, keep) = response_head(
            &mut out,
            StatusCode::from_u16(status).unwrap(),
            &headers,
            size,
            answering,
        );
        (String::from_utf8(out).unwrap(), encoder, keep)
    }

    #[test]
    fn chunk_size_lines_are_lower_hex() {
        for (len, line) in [
            (0, "0\r\n"),
            (5, "5\r\n"),
            (255, "ff\r\n"),
            (65536, "10000\r\n"),
        ] {
            let mut out = Vec::new();
            chunk_size(&mut out, len);
            assert_eq!(out, line.as_bytes());
        }
    }

    #[test]
    fn encoders_keep_count() {
        let mut out = Vec::new();
        let mut length = Encoder::Length(5);
        length.before_data(&mut out, 3).unwrap();
        assert!(length.finish(&mut out).is_err(), "2 bytes short");
        assert!(length.before_data(&mut out, 3).is_err(), "1 byte over");
        length.before_data(&mut out, 2).unwrap();
        length.finish(&mut out).unwrap();
        assert!(out.is_empty());
        let mut chunked = Encoder::Chunked;
        chunked.before_data(&mut out, 11).unwrap();
        out.extend_from_slice(b"hello world");
        chunked.after_data(&mut out);
        chunked.finish(&mut out).unwrap();
        assert_eq!(out, b"b\r\nhello world\r\n0\r\n\r\n");
    }

    #[test]
    fn request_heads_take_their_framing_from_the_body() {
        let framing = |size, declare| {
            let mut out = Vec::new();
            let encoder = request_framing(&mut out, size, declare);
            (String::from_utf8(out).unwrap(), encoder)
        };
        assert_eq!(framing(Some(0), false), ("\r\n".into(), Encoder::Bodiless));
        assert_eq!(
            framing(Some(0), true),
            ("content-length: 0\r\n\r\n".into(), Encoder::Length(0))
        );
        assert_eq!(
            framing(Some(12), false),
            ("content-length: 12\r\n\r\n".into(), Encoder::Length(12))
        );
        assert_eq!(
            framing(None, false),
            (
                "transfer-encoding: chunked\r\n\r\n".into(),
                Encoder::Chunked
            )
        );
    }

    #[test]
    fn response_heads_carry_the_framing_their_body_needs() {
        let (text, encoder, keep) = head(200, &[("x-a", "1")], Some(5), KEEP);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with("GMT\r\ncontent-length: 5\r\n\r\n"), "{text}");
        assert_eq!((encoder, keep), (Encoder::Length(5), true));

        let (text, encoder, _) = head(200, &[("transfer-encoding", "chunked")], None, KEEP);
        assert!(
            text.ends_with("transfer-encoding: chunked\r\n\r\n"),
            "{text}"
        );
        assert_eq!(text.matches("transfer-encoding").count(), 1);
        assert_eq!(encoder, Encoder::Chunked);

        let http10 = Answering {
            version: Version::HTTP_10,
            ..KEEP
        };
        let (text, encoder, keep) = head(200, &[], None, http10);
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
        assert_eq!((encoder, keep), (Encoder::UntilClose, false));
        let (text, _, keep) = head(200, &[], Some(2), http10);
        assert!(text.ends_with("connection: keep-alive\r\n\r\n"), "{text}");
        assert!(keep);

        let (text, encoder, keep) = head(
            200,
            &[
                ("content-length", "9"),
                ("connection", "close"),
                ("date", "x"),
            ],
            Some(9),
            KEEP,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ndate: x\r\nconnection: close\r\n\r\n"
        );
        assert_eq!((encoder, keep), (Encoder::Length(9), false));
    }

    #[test]
    fn bodiless_answers() {
        let head_request = Answering { head: true, ..KEEP };
        // An instance's answer to HEAD: its length passes, none is invented.
        let (text, encoder, _) = head(200, &[("content-length", "1234")], Some(0), head_request);
        assert!(text.contains("content-length: 1234\r\n"), "{text}");
        assert_eq!(encoder, Encoder::Bodiless);
        let (text, _, _) = head(200, &[], Some(0), head_request);
        assert!(!text.contains("content-length"), "{text}");
        let (text, _, _) = head(200, &[("transfer-encoding", "chunked")], None, head_request);
        assert!(
            !text.contains("content-length") && !text.contains("transfer-encoding"),
            "{text}"
        );
        // The gateway's own answer to HEAD states the GET's length.
        let (text, _, _) = head(200, &[], Some(17), head_request);
        assert!(text.contains("content-length: 17\r\n"), "{text}");

        let (text, encoder, _) = head(204, &[("content-length", "5")], Some(0), KEEP);
        assert!(!text.contains("content-length"), "{text}");
        assert_eq!(encoder, Encoder::Bodiless);
        let (text, encoder, _) = head(304, &[("content-length", "5")], Some(0), KEEP);
        assert!(text.contains("content-length: 5"), "{text}");
        assert_eq!(encoder, Encoder::Bodiless);
    }
}
