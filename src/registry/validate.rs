//! What the registry accepts as a service name, an instance id and an
//! instance URL (SPEC §3). Each check returns a sentence for the client.

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

/// Names: 1–63 characters of `a-z`, `0-9`, `-`, `_`, `.`, starting with a
/// letter or digit, so that a name is always one clean path segment.
pub fn service_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a service name is 1-63 characters of a-z, 0-9, '-', '_' and '.', \
             starting with a letter or digit; got {name:?}"
        ))
    }
}

/// Instance ids travel in URL paths (`/services/<name>/instances/<id>`):
/// 1–255 characters that need no escaping there, plus the `:`, `[`, `]` of a
/// default `host:port` id, and never a `.` or `..` segment.
pub fn instance_id(id: &str) -> Result<(), String> {
    let ok = (1..=255).contains(&id.len())
        && id != "."
        && id != ".."
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'[' | b']' | b'@')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "an instance id is 1-255 characters of A-Z, a-z, 0-9 and '-._~:[]@' \
             (and not '.' or '..'); got {id:?}"
        ))
    }
}

/// A registered instance URL, `http://host[:port][/base/path]`, taken apart
/// once at registration so the proxy path never parses it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceUrl {
    /// As registered, shown in the API.
    original: String,
    /// `host[:port]` as registered (host lower-cased): the upstream `Host`.
    authority: Authority,
    /// `host:port` with the port always written: the default instance id.
    host_port: String,
    host: String,
    port: u16,
    /// `authority` as a header value, made once for every forwarded request.
    host_header: HeaderValue,
    /// The base path without a trailing slash (`""` for the root).
    base_path: String,
}

impl InstanceUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let fail = |why: &str| {
            Err(format!(
                "an instance URL is http://host[:port][/base/path] with no user, query or \
                 fragment; {url:?} {why}"
            ))
        };
        if url.is_empty() || url.len() > 2048 {
            return fail("is empty or longer than 2048 bytes");
        }
        if url
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return fail("contains whitespace or control characters");
        }
        if url.contains('#') {
            return fail("has a fragment");
        }
        if url.contains('?') {
            return fail("has a query");
        }
        let Ok(uri) = url.parse::<Uri>() else {
            return fail("is not a valid URL");
        };
        match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTP => {}
            Some(_) => return fail("does not use the http scheme"),
            None => return fail("is not absolute (it needs http://)"),
        }
        let Some(authority) = uri.authority() else {
            return fail("has no host");
        };
        if authority.as_str().contains('@') {
            return fail("has user information");
        }
        let host = authority.host();
        if !valid_host(host) {
            return fail("has an invalid host");
        }
        let has_port = authority.as_str().len() > host.len();
        let port = match authority.port_u16() {
            Some(0) => return fail("has port 0"),
            Some(port) => port,
            None if has_port => return fail("has an invalid port"),
            None => 80,
        };
        let host = host.to_ascii_lowercase();
        let host_port = format!("{host}:{port}");
        let written = if has_port {
            host_port.clone()
        } else {
            host.clone()
        };
        let Ok(authority) = written.parse::<Authority>() else {
            return fail("has an invalid host");
        };
        let base_path = uri.path().trim_end_matches('/').to_string();
        if base_path
            .split('/')
            .any(|segment| is_dot_segment(segment.as_bytes()))
        {
            return fail("has a '.' or '..' path segment");
        }
        let Ok(host_header) = HeaderValue::from_str(authority.as_str()) else {
            return fail("has an invalid host");
        };
        Ok(Self {
            original: url.to_string(),
            authority,
            host_port,
            host,
            port,
            host_header,
            base_path,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// `host[:port]` as registered: the upstream `Host` header.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The `Host` header forwarded requests carry.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// The host as registered, lower-cased (IPv6 literals in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, port always written: the default instance id.
    pub fn host_port(&self) -> &str {
        &self.host_port
    }

    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// The origin-form target (`/base/rest?query`) for `rest` (a path
    /// starting with `/`, or empty) and an optional query, as sent on the
    /// wire: in pieces, to be written one after the other.
    pub fn target<'a>(&'a self, rest: &'a str, query: Option<&'a str>) -> [&'a str; 4] {
        let rest = if rest.is_empty() && self.base_path.is_empty() {
            "/"
        } else {
            rest
        };
        match query {
            Some(query) => [&self.base_path, rest, "?", query],
            None => [&self.base_path, rest, "", ""],
        }
    }
}

fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `.` or `..`, also when percent-encoded (`%2e`, `%2E%2e`, ...).
pub fn is_dot_segment(segment: &[u8]) -> bool {
    let mut dots = 0;
    let mut rest = segment;
    while !rest.is_empty() {
        match rest {
            [b'.', tail @ ..] => rest = tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => rest = tail,
            _ => return false,
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["a", "user-service", "svc_1.v2", "0abc", &"a".repeat(63)] {
            assert!(service_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            ".a",
            "User",
            "a b",
            "a/b",
            "é",
            &"a".repeat(64),
            "a%2F",
        ] {
            assert!(service_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_ids() {
        for ok in ["localhost:8081", "[::1]:80", "i-0abc", "a.b", "x@y"] {
            assert!(instance_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a?b",
            "a#b",
            "a%2F",
            &"a".repeat(256),
        ] {
            assert!(instance_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_accepted_and_taken_apart() {
        let u = InstanceUrl::parse("http://localhost:8081").unwrap();
        assert_eq!(u.authority().as_str(), "localhost:8081");
        assert_eq!(u.host_port(), "localhost:8081");
        assert_eq!(u.base_path(), "");
        let u = InstanceUrl::parse("http://Example.COM/api/v1/").unwrap();
        assert_eq!(u.authority().as_str(), "example.com");
        assert_eq!(u.host_port(), "example.com:80");
        assert_eq!(u.base_path(), "/api/v1");
        assert_eq!(u.as_str(), "http://Example.COM/api/v1/");
        let u = InstanceUrl::parse("http://[::1]:9000/x").unwrap();
        assert_eq!(u.authority().as_str(), "[::1]:9000");
        assert!(InstanceUrl::parse("http://10.0.0.1").is_ok());
    }

    #[test]
    fn urls_refused() {
        for bad in [
            "",
            "localhost:8081",
            "/relative",
            "https://example.com",
            "ftp://example.com",
            "http://user:pw@example.com",
            "http://example.com/?q=1",
            "http://example.com/#frag",
            "http://example.com:0",
            "http://example.com:99999",
            "http://example.com:",
            "http://exa mple.com",
            "http://exa_mple!.com",
            "http://-bad.com",
            "http://[::1",
            "http://[zz::1]",
            "http://example.com/a/../b",
            "http://example.com/a/%2e%2E/b",
            "http://",
        ] {
            assert!(InstanceUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_keep_rest_and_query_byte_for_byte() {
        let root = InstanceUrl::parse("http://h:1").unwrap();
        assert_eq!(root.target("", None).concat(), "/");
        assert_eq!(
            root.target("/a%20b/c", Some("x=%2F&y")).concat(),
            "/a%20b/c?x=%2F&y"
        );
        let based = InstanceUrl::parse("http://h:1/api/").unwrap();
        assert_eq!(based.target("", None).concat(), "/api");
        assert_eq!(based.target("/users", Some("")).concat(), "/api/users?");
        let v6 = InstanceUrl::parse("http://[::1]:8").unwrap();
        assert_eq!((v6.host(), v6.port()), ("[::1]", 8));
        assert_eq!(InstanceUrl::parse("http://h").unwrap().port(), 80);
    }

    #[test]
    fn dot_segments_in_all_spellings() {
        for dot in [".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "%2e."] {
            assert!(is_dot_segment(dot.as_bytes()), "{dot}");
        }
        for not in ["", "...", "a", ".a", "%2e%2e%2e", "%2", "%2f"] {
            assert!(!is_dot_segment(not.as_bytes()), "{not}");
        }
    }
}
