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

use std::net::IpAddr;

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

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named_in_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::try_from(token.trim()).ok())
        .collect();
    for name in named_in_connection {
        headers.remove(name);
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Rewrites a client's request headers for forwarding, once per request
/// (each attempt then only sets `Host`). `host` is the client's `Host` or
/// URI authority.
pub fn prepare_request<R: Rng + ?Sized>(
    headers: &mut HeaderMap,
    client: IpAddr,
    host: Option<HeaderValue>,
    rng: &mut R,
) {
    strip_hop_by_hop(headers);
    // `Expect: 100-continue` was answered by this hop when the body was read.
    headers.remove(header::EXPECT);
    headers.remove(header::HOST);

    let forwarded_for = match joined(headers, &X_FORWARDED_FOR) {
        Some(previous) => format!("{previous}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::try_from(forwarded_for) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
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

/// Every value of `name`, joined with `, ` as one list (RFC 9110 §5.3).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    Some(values.fold(first.to_string(), |mut all, v| {
        all.push_str(", ");
        all.push_str(v);
        all
    }))
}

/// A random version 4 UUID.
fn request_id<R: Rng + ?Sized>(rng: &mut R) -> HeaderValue {
    let bits: u128 = rng.random();
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    let id = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    HeaderValue::try_from(id).unwrap_or_else(|_| HeaderValue::from_static("0"))
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
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        prepare_request(
            &mut h,
            client,
            Some(HeaderValue::from_static("gateway.local:8080")),
            &mut rng,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.2, 127.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "gateway.local:8080");
        assert!(!h.contains_key("host"), "set per instance");
        assert!(!h.contains_key("expect"));
        let id = h["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "version 4: {id}");
    }

    #[test]
    fn an_existing_request_id_is_kept_and_ipv6_clients_are_written_plainly() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut h = headers(&[("x-request-id", "abc-123")]);
        prepare_request(&mut h, "::1".parse().unwrap(), None, &mut rng);
        assert_eq!(h["x-request-id"], "abc-123");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert!(!h.contains_key("x-forwarded-host"));
    }

    #[test]
    fn request_ids_differ() {
        let mut rng = SmallRng::seed_from_u64(9);
        assert_ne!(request_id(&mut rng), request_id(&mut rng));
    }
}
