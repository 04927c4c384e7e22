//! Header rules of the proxy path (SPEC §5).
//!
//! Hop-by-hop headers belong to one connection and are never forwarded, in
//! either direction (RFC 9110 §7.6.1): `Connection` and every header it
//! names, plus `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding` and `Upgrade`. The upstream gets `Host` set to the
//! instance's authority (the client's `Host` moves to `X-Forwarded-Host`),
//! the client's address appended to `X-Forwarded-For`, and an
//! `X-Request-Id` (kept, or made up) so one call can be followed across
//! services.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::{Rng, RngExt};

use crate::http1::encode::field;
use crate::http1::hop::{ConnectionOptions, is_hop_by_hop};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Names the instance that answered, on every proxied response.
pub static X_SWITCHYARD_UPSTREAM: HeaderName = HeaderName::from_static("x-switchyard-upstream");

/// The client end of one connection, with its `X-Forwarded-For` entry
/// written once for every request the connection carries.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

/// Room for the text of any IP address (`INET6_ADDRSTRLEN`, less its NUL:
/// an IPv6 address ending in an IPv4 one is the longest there is).
const IP_TEXT_MAX: usize = 45;

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        // A client that opens a connection per request makes one of these
        // per request. Written out in place: formatting an `Ipv4Addr` into
        // a `String` took about 1 300 instructions and grew the `String`
        // twice; this saves some 900 of them per connection.
        let mut text = [0u8; IP_TEXT_MAX];
        let len = match addr.ip().to_canonical() {
            IpAddr::V4(ip) => {
                let mut len = 0;
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        text[len] = b'.';
                        len += 1;
                    }
                    let mut buffer = itoa::Buffer::new();
                    let digits = buffer.format(octet).as_bytes();
                    text[len..len + digits.len()].copy_from_slice(digits);
                    len += digits.len();
                }
                Some(len)
            }
            ip => {
                let mut rest = &mut text[..];
                write!(rest, "{ip}").ok().map(|()| IP_TEXT_MAX - rest.len())
            }
        };
        let forwarded_for = len.and_then(|len| HeaderValue::from_bytes(&text[..len]).ok());
        Self {
            addr,
            forwarded_for: forwarded_for.unwrap_or(HeaderValue::from_static("unknown")),
        }
    }

    /// A client whose address the server that took the request did not
    /// say: forwarded as `unknown`.
    pub fn unknown() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            forwarded_for: HeaderValue::from_static("unknown"),
        }
    }
}

/// The header fields an instance receives for a client's request, as
/// `name: value\r\n` lines, encoded once per request and sent by every
/// attempt after its request line and `Host`.
///
/// The client's fields go through in their order, minus the hop-by-hop ones
/// (and those `Connection` names), `Host` (each attempt sets the
/// instance's), `Expect` (this hop answered `100-continue` when it read the
/// body), the framing headers (the upstream connection frames what it
/// sends) and the ones rewritten here: `X-Forwarded-For` gets the client's
/// address appended, `X-Forwarded-Proto` is set, `X-Forwarded-Host` becomes
/// the client's `Host` (`host`), and `Via` gets this gateway's entry
/// appended. (`X-Request-Id` is kept as it comes: the gateway's stack has
/// made one up when the client sent none.) Header values cannot hold CR
/// or LF, so nothing a client sends can add a line of its own.
pub fn forward_fields(
    headers: &HeaderMap,
    peer: &Peer,
    host: Option<&HeaderValue>,
    via: &HeaderValue,
) -> Vec<u8> {
    let listed = ConnectionOptions::of(headers.get_all(header::CONNECTION).iter()).listed;
    let mut out = Vec::with_capacity(256);
    for (name, value) in headers {
        let rewritten = *name == header::HOST
            || *name == header::EXPECT
            || *name == header::CONTENT_LENGTH
            || *name == header::VIA
            || *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_HOST;
        if rewritten || is_hop_by_hop(name) || listed.contains(name) {
            continue;
        }
        field(&mut out, name.as_str(), value.as_bytes());
    }
    append_to_list(
        &mut out,
        &X_FORWARDED_FOR,
        headers,
        peer.forwarded_for.as_bytes(),
    );
    field(&mut out, X_FORWARDED_PROTO.as_str(), b"http");
    if let Some(host) = host {
        field(&mut out, X_FORWARDED_HOST.as_str(), host.as_bytes());
    }
    append_to_list(&mut out, &header::VIA, headers, via.as_bytes());
    out
}

/// Writes `name` as one list (RFC 9110 §5.3): every value the client sent,
/// then `entry`.
fn append_to_list(out: &mut Vec<u8>, name: &HeaderName, headers: &HeaderMap, entry: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    for value in headers.get_all(name) {
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(entry);
    out.extend_from_slice(b"\r\n");
}

/// Whether the request already passed through a gateway called `name`:
/// its `Via` has an entry received by `name` (RFC 9110 §7.6.3).
pub fn passed_through(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|entry| entry.split_whitespace().nth(1))
        .any(|received_by| received_by.eq_ignore_ascii_case(name))
}

/// A random version 4 UUID, written without the formatting machinery (it
/// runs on every request that arrives without an id).
pub fn request_id<R: Rng + ?Sized>(rng: &mut R) -> [u8; 36] {
    /// Where each of the 16 bytes goes in `8-4-4-4-12` hex.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = rng.random::<u128>().to_be_bytes();
    // Version 4, variant 10 (RFC 9562 §5.4).
    bytes[6] = bytes[6] & 0x0f | 0x40;
    bytes[8] = bytes[8] & 0x3f | 0x80;
    let mut id = [b'-'; 36];
    for (byte, at) in bytes.into_iter().zip(AT) {
        id[at] = HEX[usize::from(byte >> 4)];
        id[at + 1] = HEX[usize::from(byte & 0xf)];
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::try_from(*name).unwrap(),
                HeaderValue::try_from(*value).unwrap(),
            );
        }
        map
    }

    /// The fields forwarded for `pairs`, read back as (name, value) lines.
    fn forwarded(pairs: &[(&str, &str)], host: Option<&str>, peer: &str) -> Vec<(String, String)> {
        let host = host.map(|h| HeaderValue::try_from(h).unwrap());
        let out = forward_fields(
            &headers(pairs),
            &Peer::new(peer.parse().unwrap()),
            host.as_ref(),
            &HeaderValue::from_static("1.1 registry"),
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("\r\n"), "{text:?}");
        text.split_terminator("\r\n")
            .map(|line| {
                let (name, value) = line.split_once(": ").expect("name: value");
                (name.to_string(), value.to_string())
            })
            .collect()
    }

    fn value<'a>(fields: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let fields = forwarded(
            &[
                ("connection", "keep-alive, X-Secret-Hop"),
                ("connection", "close"),
                ("x-secret-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers"),
                ("trailer", "x-checksum"),
                ("transfer-encoding", "chunked"),
                ("content-length", "5"),
                ("upgrade", "websocket"),
                ("x-end-to-end", "stays"),
                ("content-type", "text/plain"),
                ("x-request-id", "r-1"),
            ],
            None,
            "127.0.0.1:5000",
        );
        let names: Vec<_> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "x-end-to-end",
                "content-type",
                "x-request-id",
                "x-forwarded-for",
                "x-forwarded-proto",
                "via"
            ]
        );
    }

    #[test]
    fn forwarding_headers_are_set_and_appended() {
        let fields = forwarded(
            &[
                ("host", "gateway.local:8080"),
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-for", "10.0.0.2"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "spoofed"),
                ("expect", "100-continue"),
            ],
            Some("gateway.local:8080"),
            "127.0.0.1:5000",
        );
        assert_eq!(
            value(&fields, "x-forwarded-for"),
            ["203.0.113.7, 10.0.0.2, 127.0.0.1"]
        );
        assert_eq!(value(&fields, "x-forwarded-proto"), ["http"]);
        assert_eq!(value(&fields, "x-forwarded-host"), ["gateway.local:8080"]);
        assert!(value(&fields, "expect").is_empty());
        assert!(value(&fields, "host").is_empty(), "each attempt sets Host");
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let mut rng = SmallRng::seed_from_u64(1);
        let id = request_id(&mut rng);
        let id = std::str::from_utf8(&id).unwrap();
        assert_eq!(id.len(), 36);
        let dashes: Vec<_> = id.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8, 13, 18, 23], "{id}");
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant: {id}"
        );
    }

    #[test]
    fn an_existing_request_id_is_kept_and_ipv6_clients_are_written_plainly() {
        let fields = forwarded(
            &[("x-request-id", "abc-123"), ("x-forwarded-host", "spoofed")],
            None,
            "[::1]:5000",
        );
        assert_eq!(value(&fields, "x-request-id"), ["abc-123"]);
        assert_eq!(value(&fields, "x-forwarded-for"), ["::1"]);
        assert!(value(&fields, "x-forwarded-host").is_empty());
    }

    #[test]
    fn via_entries_are_appended_and_loops_recognised() {
        let h = headers(&[("via", "1.0 fred, 1.1 p.example.net (Apache/1.1)")]);
        assert!(!passed_through(&h, "registry"));
        assert!(passed_through(&h, "p.example.net"));
        let fields = forwarded(
            &[("via", "1.0 fred, 1.1 p.example.net (Apache/1.1)")],
            None,
            "127.0.0.1:1",
        );
        let via = value(&fields, "via");
        assert_eq!(
            via,
            ["1.0 fred, 1.1 p.example.net (Apache/1.1), 1.1 registry"]
        );
        let h = headers(&[("via", via[0])]);
        assert!(passed_through(&h, "registry"));
        assert!(
            passed_through(&h, "REGISTRY"),
            "names compare case-insensitively"
        );
        assert_eq!(
            value(&forwarded(&[], None, "127.0.0.1:1"), "via"),
            ["1.1 registry"]
        );
    }

    #[test]
    fn ipv4_mapped_clients_are_written_as_ipv4() {
        let peer = Peer::new("[::ffff:10.1.2.3]:80".parse().unwrap());
        assert_eq!(peer.forwarded_for, "10.1.2.3");
    }

    #[test]
    fn every_address_is_written_whole() {
        for (addr, text) in [
            ("192.168.100.200:1", "192.168.100.200"),
            ("0.9.10.255:1", "0.9.10.255"),
            ("[::1]:1", "::1"),
            (
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
            // Only a mapped IPv4 address is written as IPv4 (above).
            ("[::1.2.3.4]:1", "::102:304"),
        ] {
            assert_eq!(Peer::new(addr.parse().unwrap()).forwarded_for, text);
        }
    }

    #[test]
    fn request_ids_differ() {
        let mut rng = SmallRng::seed_from_u64(9);
        assert_ne!(request_id(&mut rng), request_id(&mut rng));
    }
}
