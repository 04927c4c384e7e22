//! Message bodies: delimited by a length, by chunks, or by the end of the
//! connection (RFC 9112 §6, §7). One decoder for request bodies read by
//! the server and response bodies read by the client.
//!
//! Chunked framing is read strictly: a chunk size is 1 to 16 hex digits
//! (no sign, no spaces inside), optionally followed by extensions after
//! `;`; every line (size lines, the CRLF after data, trailer lines) ends
//! in CRLF, and a bare LF or CR anywhere in one is an error. Leniency here
//! is what lets two parsers disagree on where a message ends. Extensions
//! and trailers are read and dropped.

use bytes::{Buf, Bytes, BytesMut};

use super::head::BodyLength;

/// A chunk-size line (with its extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// A trailer section larger than this is refused.
const MAX_TRAILERS: usize = 16 * 1024;

/// Where a body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the connection closes.
    UntilClose,
    /// The body has ended: what follows belongs to the next message.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This many bytes of chunk data to come.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// Trailer lines, this many bytes of them so far.
    Trailers(usize),
}

/// What one step of decoding gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer holds no more of the body: read more.
    NeedMore,
    /// The body has ended.
    Done,
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for DecodeError {}

impl Decoder {
    pub fn new(length: BodyLength) -> Self {
        match length {
            BodyLength::Length(0) => Self::Done,
            BodyLength::Length(n) => Self::Length(n),
            BodyLength::Chunked => Self::Chunked(Chunk::Size),
            BodyLength::UntilClose => Self::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        *self == Self::Done
    }

    /// The bytes still to come, when that is known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Self::Length(n) => Some(*n),
            Self::Done => Some(0),
            _ => None,
        }
    }

    /// How many bytes read next from the connection are body data as they
    /// are, with no framing among them: a reader whose buffer is empty may
    /// read up to this much and hand it on whole ([`Decoder::took`]).
    /// `None` while framing comes next (a chunk-size line, the CRLF after
    /// chunk data, trailers) or the body has ended.
    pub fn raw_data(&self) -> Option<u64> {
        match *self {
            Self::Length(left) | Self::Chunked(Chunk::Data(left)) => Some(left),
            Self::UntilClose => Some(u64::MAX),
            Self::Chunked(_) | Self::Done => None,
        }
    }

    /// Records `n` bytes of body data read past the decoder, as
    /// [`Decoder::raw_data`] allowed.
    pub fn took(&mut self, n: u64) {
        match *self {
            Self::Length(left) => {
                debug_assert!(n <= left);
                *self = if n >= left {
                    Self::Done
                } else {
                    Self::Length(left - n)
                };
            }
            Self::Chunked(Chunk::Data(left)) => {
                debug_assert!(n <= left);
                *self = Self::Chunked(if n >= left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                });
            }
            Self::UntilClose | Self::Chunked(_) | Self::Done => {}
        }
    }

    /// Takes the next piece of body off the front of `buf`, leaving what
    /// follows the body there.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        loop {
            match *self {
                Self::Done => return Ok(Decoded::Done),
                Self::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = left.min(buf.len() as u64);
                    *self = if n == left {
                        Self::Done
                    } else {
                        Self::Length(left - n)
                    };
                    return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
                }
                Self::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Self::Chunked(Chunk::Size) => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE, "chunk size line too long")?
                    else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&line)?;
                    *self = Self::Chunked(if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    });
                }
                Self::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = left.min(buf.len() as u64);
                    *self = Self::Chunked(if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    });
                    return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
                }
                Self::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|&b| b != b'\r') {
                            return Err(DecodeError("chunk data not followed by CRLF"));
                        }
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(DecodeError("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Self::Chunked(Chunk::Size);
                }
                Self::Chunked(Chunk::Trailers(seen)) => {
                    let left = MAX_TRAILERS.saturating_sub(seen);
                    let Some(line) = take_line(buf, left, "trailers too large")? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line.is_empty() {
                        *self = Self::Done;
                    } else if !is_field_line(&line) {
                        return Err(DecodeError("invalid trailer field"));
                    } else {
                        *self = Self::Chunked(Chunk::Trailers(seen + line.len() + 2));
                    }
                }
            }
        }
    }

    /// The connection ended (the peer closed it): fine for a body that
    /// runs until then, an error for one cut short.
    pub fn end_of_input(&mut self) -> Result<(), DecodeError> {
        match self {
            Self::Done => Ok(()),
            Self::UntilClose => {
                *self = Self::Done;
                Ok(())
            }
            _ => Err(DecodeError("the connection closed before the body ended")),
        }
    }
}

/// Takes one CRLF-terminated line off `buf` (without its CRLF), or `None`
/// while it is incomplete. A bare CR or LF in it is an error, as is a line
/// longer than `max`.
fn take_line(
    buf: &mut BytesMut,
    max: usize,
    too_long: &'static str,
) -> Result<Option<BytesMut>, DecodeError> {
    let Some(lf) = memchr::memchr(b'\n', buf) else {
        if buf.len() > max {
            return Err(DecodeError(too_long));
        }
        if memchr::memchr(b'\r', buf).is_some_and(|cr| cr + 1 < buf.len()) {
            return Err(DecodeError("a bare CR in a chunked body"));
        }
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(DecodeError("a bare LF in a chunked body"));
    }
    if lf > max + 1 {
        return Err(DecodeError(too_long));
    }
    if memchr::memchr(b'\r', &buf[..lf - 1]).is_some() {
        return Err(DecodeError("a bare CR in a chunked body"));
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf - 1);
    Ok(Some(line))
}

/// Whether `line` is a field line (RFC 9110 §5.1, RFC 9112 §5): a
/// token, a colon, and a value of visible characters, spaces and tabs.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = memchr::memchr(b':', line) else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name.iter().all(|&b| is_tchar(b))
        && value
            .iter()
            .all(|&b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80)
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A chunk-size line's size: 1 to 16 hex digits, then nothing, or
/// optional spaces or tabs and `;` extensions (RFC 9112 §7.1.1).
fn chunk_size(line: &[u8]) -> Result<u64, DecodeError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(DecodeError("invalid chunk size"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !(rest.is_empty() || rest[0] == b';') || (rest.is_empty() && digits < line.len()) {
        return Err(DecodeError("invalid chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        n << 4 | u64::from(v)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data taken past the decoder leaves it where decoding the same bytes
    /// would have: at the end of a length, at the CRLF after chunk data.
    #[test]
    fn raw_data_taken_past_the_decoder_moves_it_on_as_decoding_would() {
        let mut length = Decoder::new(BodyLength::Length(10));
        assert_eq!(length.raw_data(), Some(10));
        length.took(4);
        assert_eq!(length.raw_data(), Some(6));
        length.took(6);
        assert!(length.is_done());
        assert_eq!(length.raw_data(), None);

        let mut chunked = Decoder::new(BodyLength::Chunked);
        assert_eq!(chunked.raw_data(), None, "a chunk-size line comes first");
        let mut wire = BytesMut::from(&b"5\r\nhe"[..]);
        assert_eq!(
            chunked.decode(&mut wire),
            Ok(Decoded::Data(Bytes::from_static(b"he")))
        );
        assert_eq!(chunked.raw_data(), Some(3));
        chunked.took(3);
        assert_eq!(
            chunked.raw_data(),
            None,
            "the CRLF after the data comes next"
        );
        let mut rest = BytesMut::from(&b"\r\n0\r\n\r\n"[..]);
        assert_eq!(chunked.decode(&mut rest), Ok(Decoded::Done));
        assert!(rest.is_empty());

        let mut until_close = Decoder::new(BodyLength::UntilClose);
        until_close.took(1 << 20);
        assert_eq!(until_close.raw_data(), Some(u64::MAX));
    }

    /// Decodes `wire` fed whole and in every two-part split; returns the
    /// body and what followed it (the same every time).
    fn decode_all(length: BodyLength, wire: &[u8]) -> Result<(Vec<u8>, Vec<u8>), DecodeError> {
        let run = |parts: &[&[u8]]| -> Result<(Vec<u8>, Vec<u8>), DecodeError> {
            let mut decoder = Decoder::new(length);
            let mut buf = BytesMut::new();
            let mut body = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                buf.extend_from_slice(part);
                loop {
                    match decoder.decode(&mut buf)? {
                        Decoded::Data(data) => body.extend_from_slice(&data),
                        Decoded::NeedMore => break,
                        Decoded::Done => {
                            let mut rest = buf.to_vec();
                            rest.extend(parts[i + 1..].iter().flat_map(|p| p.iter()));
                            return Ok((body, rest));
                        }
                    }
                }
            }
            decoder.end_of_input()?;
            Ok((body, buf.to_vec()))
        };
        let whole = run(&[wire]);
        for at in 0..wire.len() {
            assert_eq!(run(&[&wire[..at], &wire[at..]]), whole, "split at {at}");
        }
        whole
    }

    #[test]
    fn chunked_bodies_survive_any_split() {
        let (body, rest) = decode_all(
            BodyLength::Chunked,
            b"5;ext=1\r\nhello\r\n1 ; a=\"b\"\r\n \r\nA\r\nworld12345\r\n0\r\nTrailer: x\r\n\r\nGET /next",
        )
        .unwrap();
        assert_eq!(body, b"hello world12345");
        assert_eq!(rest, b"GET /next");
    }

    #[test]
    fn lengths_and_close_delimited_bodies() {
        let (body, rest) = decode_all(BodyLength::Length(5), b"helloGET").unwrap();
        assert_eq!(
            (body.as_slice(), rest.as_slice()),
            (&b"hello"[..], &b"GET"[..])
        );
        let (body, _) = decode_all(BodyLength::UntilClose, b"all of it").unwrap();
        assert_eq!(body, b"all of it");
        assert!(decode_all(BodyLength::Length(10), b"short").is_err());
        assert!(decode_all(BodyLength::Chunked, b"5\r\nhel").is_err());
        assert_eq!(Decoder::new(BodyLength::Length(0)), Decoder::Done);
    }

    #[test]
    fn malformed_chunking_is_an_error() {
        for bad in [
            &b"+5\r\nhello\r\n0\r\n\r\n"[..],
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"5\r\nhello\r\n0\r\nX: 1\n\r\n",
            b"5\r\nhello\r\n0\r\n folded: x\r\n\r\n",
            b"5\r\nhello\r\n0\r\nno colon\r\n\r\n",
            b"5\r\nhello\r\n0\r\nBad Name: 1\r\n\r\n",
            b"5\r\nhello\r\n0\r\n: 1\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T : 1\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T: a\x01b\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-T: a\x7fb\r\n\r\n",
            b"5\x0c;a\r\nhello\r\n0\r\n\r\n",
            b"5\rx\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
        ] {
            assert!(
                decode_all(BodyLength::Chunked, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_line = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "x".repeat(MAX_CHUNK_LINE + 10)
        );
        assert!(decode_all(BodyLength::Chunked, long_line.as_bytes()).is_err());
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"0"), Ok(0));
        assert_eq!(chunk_size(b"fF"), Ok(255));
        assert_eq!(chunk_size(b"ffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(chunk_size(b"10;x"), Ok(16));
        assert_eq!(chunk_size(b"10 \t;x"), Ok(16));
        assert!(chunk_size(b"10 ").is_err());
        assert!(chunk_size(b"").is_err());
    }
}
