//! Taking `/call/<service>[/<rest>][?query]` apart, byte for byte.
//!
//! The rest of the path is forwarded exactly as received: no decoding, no
//! re-encoding, no normalisation. Because the upstream may normalise it
//! itself, a path that could climb out of the instance's base path is
//! refused (SPEC §5): a `.` or `..` segment, raw or percent-encoded, or one
//! that an encoded slash (`%2F`) or backslash would turn into such a segment.

use http::Uri;

use crate::error::{ErrorCode, GatewayError};
use crate::registry::validate::{self, is_dot_segment};

/// The prefix of every proxied path.
pub const PREFIX: &str = "/call/";

/// A parsed proxy target, borrowing from the request's URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallTarget<'a> {
    pub service: &'a str,
    /// `""` or a path starting with `/`.
    pub rest: &'a str,
    pub query: Option<&'a str>,
}

impl<'a> CallTarget<'a> {
    pub fn parse(uri: &'a Uri) -> Result<Self, GatewayError> {
        let path = uri.path();
        let Some(after) = path.strip_prefix(PREFIX) else {
            return Err(GatewayError::new(
                ErrorCode::NotFound,
                "proxied calls take the form /call/<service>/<path>",
            ));
        };
        let (service, rest) = match after.find('/') {
            Some(at) => after.split_at(at),
            None => (after, ""),
        };
        if service.is_empty() {
            return Err(GatewayError::new(
                ErrorCode::NotFound,
                "proxied calls take the form /call/<service>/<path>",
            ));
        }
        validate::service_name(service)
            .map_err(|m| GatewayError::new(ErrorCode::InvalidName, m))?;
        if climbs(rest) {
            return Err(GatewayError::new(
                ErrorCode::InvalidPath,
                "the path has a '.' or '..' segment (possibly percent-encoded)",
            ));
        }
        Ok(Self {
            service,
            rest,
            query: uri.query(),
        })
    }
}

/// Whether any segment of `path` is a dot segment, counting `%2F`, `%5C`
/// and `\` as separators too.
fn climbs(path: &str) -> bool {
    path.as_bytes()
        .split(|&b| b == b'/' || b == b'\\')
        .flat_map(split_encoded_separators)
        .any(is_dot_segment)
}

/// Splits a raw segment at `%2F`/`%2f`/`%5C`/`%5c`.
fn split_encoded_separators(segment: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(segment);
    std::iter::from_fn(move || {
        let current = rest?;
        let found = current.windows(3).position(|w| {
            w[0] == b'%'
                && ((w[1] == b'2' && matches!(w[2], b'f' | b'F'))
                    || (w[1] == b'5' && matches!(w[2], b'c' | b'C')))
        });
        match found {
            Some(at) => {
                rest = Some(&current[at + 3..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> Result<(String, String, Option<String>), ErrorCode> {
        let uri: Uri = uri.parse().unwrap();
        CallTarget::parse(&uri)
            .map(|t| {
                (
                    t.service.to_string(),
                    t.rest.to_string(),
                    t.query.map(str::to_string),
                )
            })
            .map_err(|e| e.code())
    }

    #[test]
    fn splits_service_rest_and_query() {
        assert_eq!(
            parse("/call/users").unwrap(),
            ("users".into(), "".into(), None)
        );
        assert_eq!(
            parse("/call/users/").unwrap(),
            ("users".into(), "/".into(), None)
        );
        assert_eq!(
            parse("/call/users/a/b%20c/?x=1&y=%2F").unwrap(),
            ("users".into(), "/a/b%20c/".into(), Some("x=1&y=%2F".into()))
        );
        assert_eq!(
            parse("/call/users?q").unwrap(),
            ("users".into(), "".into(), Some("q".into()))
        );
        assert_eq!(parse("/call/u/a%2Fb").unwrap().1, "/a%2Fb", "kept encoded");
        assert_eq!(parse("/call/u/...").unwrap().1, "/...");
        assert_eq!(parse("/call/u/a..b/.c/").unwrap().1, "/a..b/.c/");
    }

    #[test]
    fn refuses_dot_segments_in_every_spelling() {
        for bad in [
            "/call/u/.",
            "/call/u/..",
            "/call/u/a/../b",
            "/call/u/a/./b",
            "/call/u/%2e%2e/b",
            "/call/u/%2E./b",
            "/call/u/.%2e",
            "/call/u/a%2F..%2Fb",
            "/call/u/a%2f%2e%2e",
            "/call/u/..%2Fetc",
            "/call/u/a%5C..%5Cb",
            "/call/u/a\\..\\b",
        ] {
            assert_eq!(parse(bad), Err(ErrorCode::InvalidPath), "{bad}");
        }
    }

    #[test]
    fn refuses_bad_service_names() {
        assert_eq!(parse("/call/"), Err(ErrorCode::NotFound));
        assert_eq!(parse("/call//x"), Err(ErrorCode::NotFound));
        assert_eq!(parse("/call/Users/x"), Err(ErrorCode::InvalidName));
        assert_eq!(parse("/call/..%2F/x"), Err(ErrorCode::InvalidName));
    }
}
