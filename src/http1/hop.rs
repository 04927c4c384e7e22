//! Hop-by-hop fields (RFC 9110 §7.6.1): they belong to one connection and
//! are never forwarded, in either direction: `Connection` and every field
//! it names, plus `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding` and `Upgrade`.

use http::header::{self, HeaderName, HeaderValue};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The fixed hop-by-hop fields.
static HOP_BY_HOP: [&HeaderName; 7] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// Whether `name` is one of the fixed hop-by-hop fields.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// What `Connection` values say: `close`, `keep-alive`, and the other
/// fields they name, which are hop-by-hop too. Read the same way for
/// requests and responses.
#[derive(Debug, Default)]
pub struct ConnectionOptions {
    pub close: bool,
    pub keep_alive: bool,
    /// The other fields named; usually none, and then nothing is allocated.
    pub listed: Vec<HeaderName>,
    /// Something that is not a field name was named (or the value is not text).
    pub unreadable: bool,
}

impl ConnectionOptions {
    /// The options of every value given.
    pub fn of<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Self {
        let mut options = Self::default();
        for value in values {
            options.add(value.as_bytes());
        }
        options
    }

    /// Takes in one more `Connection` value. Read as bytes: a name is
    /// ASCII, and anything else makes it unreadable. Empty list elements
    /// are skipped (RFC 9110 §5.6.1).
    pub fn add(&mut self, value: &[u8]) {
        for token in value
            .split(|&b| b == b',')
            .map(super::head::trim_whitespace)
        {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !token.is_empty() {
                match HeaderName::from_bytes(token) {
                    Ok(name) => self.listed.push(name),
                    Err(_) => self.unreadable = true,
                }
            }
        }
    }

    /// Whether `name` is hop-by-hop on a message with these options.
    pub fn is_hop_by_hop(&self, name: &HeaderName) -> bool {
        is_hop_by_hop(name) || self.listed.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_values_are_read_as_comma_separated_tokens() {
        let read = |values: &[&[u8]]| {
            let mut options = ConnectionOptions::default();
            for value in values {
                options.add(value);
            }
            options
        };
        let o = read(&[b"keep-alive"]);
        assert!(o.keep_alive && !o.close && o.listed.is_empty() && !o.unreadable);
        let o = read(&[b" Keep-Alive , X-Trace", b"CLOSE"]);
        assert!(o.keep_alive && o.close && !o.unreadable);
        assert_eq!(o.listed, [HeaderName::from_static("x-trace")]);
        assert!(o.is_hop_by_hop(&HeaderName::from_static("x-trace")));
        assert!(o.is_hop_by_hop(&header::UPGRADE));
        assert!(!o.is_hop_by_hop(&header::CONTENT_TYPE));
        // Empty list elements are allowed and mean nothing.
        let o = read(&[b"close,, ,"]);
        assert!(o.close && o.listed.is_empty() && !o.unreadable);
        // Not a field name: a space inside, or bytes beyond ASCII.
        assert!(read(&[b"x trace"]).unreadable);
        assert!(read(&[b"close, \xc3\xa9t\xc3\xa9"]).unreadable);
        assert!(read(&[b"close, \xff"]).close);
    }

    #[test]
    fn the_fixed_list() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!is_hop_by_hop(&header::CONTENT_LENGTH));
        assert!(!is_hop_by_hop(&header::HOST));
    }
}
