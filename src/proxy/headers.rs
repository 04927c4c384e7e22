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

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::{Rng, RngExt};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Names the instance that answered, on every proxied response.
pub static X_SWITCHYARD_UPSTREAM: HeaderName = HeaderName::from_static("x-switchyard-upstream");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The client end of one connection, with its `X-Forwarded-For` entry
/// written once for every request the connection carries.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = addr.ip().to_canonical().to_string();
        Self {
            addr,
            forwarded_for: HeaderValue::try_from(ip).unwrap_or(HeaderValue::from_static("unknown")),
        }
    }
}

/// The fixed hop-by-hop headers, each with its bit in a found-set.
static HOP_BY_HOP: [&HeaderName; 7] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1.
///
/// One pass over the names finds which are present (most messages carry
/// none, or only `Connection: keep-alive`); only those are removed, plus
/// any other header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found = 0u8;
    for name in headers.keys() {
        if let Some(bit) = HOP_BY_HOP.iter().position(|hop| *hop == name) {
            found |= 1 << bit;
        }
    }
    if found == 0 {
        return;
    }
    if found & 1 != 0 {
        // Usually just "keep-alive" or "close", which name no other header.
        let tokens = || {
            headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .flat_map(|value| value.split(','))
                .map(str::trim)
                .filter(|token| {
                    !token.eq_ignore_ascii_case("keep-alive")
                        && !token.eq_ignore_ascii_case("close")
                })
        };
        if tokens().next().is_some() {
            let listed: Vec<HeaderName> = tokens()
                .filter_map(|token| HeaderName::try_from(token).ok())
                .collect();
            for name in listed {
                headers.remove(name);
            }
        }
    }
    for (bit, name) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << bit) != 0 {
            headers.remove(*name);
        }
    }
}

/// Rewrites a client's request headers for forwarding, once per request
/// (each attempt then sets `Host`, replacing the client's). `host` is the
/// client's `Host` or URI authority.
pub fn prepare_request<R: Rng + ?Sized>(
    headers: &mut HeaderMap,
    peer: &Peer,
    host: Option<HeaderValue>,
    rng: &mut R,
) {
    strip_hop_by_hop(headers);
    if headers.contains_key(header::EXPECT) {
        // `Expect: 100-continue` was answered by this hop when the body was read.
        headers.remove(header::EXPECT);
    }
    let forwarded_for = match joined(headers, &X_FORWARDED_FOR) {
        Some(mut previous) => {
            previous.extend_from_slice(b", ");
            previous.extend_from_slice(peer.forwarded_for.as_bytes());
            HeaderValue::from_bytes(&previous).unwrap_or_else(|_| peer.forwarded_for.clone())
        }
        None => peer.forwarded_for.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), request_id(rng));
    }
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

/// Adds this gateway's `Via` entry after any already there.
pub fn append_via(headers: &mut HeaderMap, entry: &HeaderValue) {
    let value = match joined(headers, &header::VIA) {
        Some(mut previous) => {
            previous.extend_from_slice(b", ");
            previous.extend_from_slice(entry.as_bytes());
            HeaderValue::from_bytes(&previous).unwrap_or_else(|_| entry.clone())
        }
        None => entry.clone(),
    };
    headers.insert(header::VIA, value);
}

/// Every value of `name`, joined with `, ` as one list (RFC 9110 §5.3).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<u8>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut all = first.as_bytes().to_vec();
    for value in values {
        all.extend_from_slice(b", ");
        all.extend_from_slice(value.as_bytes());
    }
    Some(all)
}

/// A random version 4 UUID, written without the formatting machinery (it
/// runs on every request that arrives without an id).
fn request_id<R: Rng + ?Sized>(rng: &mut R) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rng.random();
    // Version 4, variant 10 (RFC 9562 §5.4).
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let mut id = [b'-'; 36];
    let mut nibble = 32;
    for (i, byte) in id.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        nibble -= 1;
        *byte = HEX[((bits >> (nibble * 4)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
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

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "close"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-end-to-end", "stays"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-end-to-end"]);
    }

    #[test]
    fn forwarding_headers_are_set_and_appended() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut h = headers(&[
            ("host", "gateway.local:8080"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("expect", "100-continue"),
        ]);
        let peer = Peer::new("127.0.0.1:5000".parse().unwrap());
        prepare_request(
            &mut h,
            &peer,
            Some(HeaderValue::from_static("gateway.local:8080")),
            &mut rng,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.2, 127.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "gateway.local:8080");
        assert!(!h.contains_key("expect"));
        let id = h["x-request-id"].to_str().unwrap();
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
        let mut rng = SmallRng::seed_from_u64(1);
        let mut h = headers(&[("x-request-id", "abc-123")]);
        prepare_request(
            &mut h,
            &Peer::new("[::1]:5000".parse().unwrap()),
            None,
            &mut rng,
        );
        assert_eq!(h["x-request-id"], "abc-123");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert!(!h.contains_key("x-forwarded-host"));
    }

    #[test]
    fn via_entries_are_appended_and_loops_recognised() {
        let mut h = headers(&[("via", "1.0 fred, 1.1 p.example.net (Apache/1.1)")]);
        assert!(!passed_through(&h, "registry"));
        assert!(passed_through(&h, "p.example.net"));
        append_via(&mut h, &HeaderValue::from_static("1.1 registry"));
        assert_eq!(
            h["via"],
            "1.0 fred, 1.1 p.example.net (Apache/1.1), 1.1 registry"
        );
        assert!(passed_through(&h, "registry"));
        assert!(
            passed_through(&h, "REGISTRY"),
            "names compare case-insensitively"
        );
        let mut fresh = HeaderMap::new();
        append_via(&mut fresh, &HeaderValue::from_static("1.1 registry"));
        assert_eq!(fresh["via"], "1.1 registry");
    }

    #[test]
    fn ipv4_mapped_clients_are_written_as_ipv4() {
        let peer = Peer::new("[::ffff:10.1.2.3]:80".parse().unwrap());
        assert_eq!(peer.forwarded_for, "10.1.2.3");
    }

    #[test]
    fn request_ids_differ() {
        let mut rng = SmallRng::seed_from_u64(9);
        assert_ne!(request_id(&mut rng), request_id(&mut rng));
    }
}
