//! Protection end to end (SPEC §6): the admin token, the upstream policy
//! against SSRF, limits against slow and hostile clients, and framing and
//! routing hygiene. Framing cases are raw bytes written to a socket.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Echo, TestGateway, Way, each_way};
use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

/// Writes `bytes` on a new connection that went `gw`'s way (fresh, or
/// after a registry call), then reads until the server closes or `wait`
/// passes. Returns what was read and whether the server closed the
/// connection.
async fn raw(gw: &TestGateway, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut stream = gw.raw().await;
    stream.write_all(bytes).await.unwrap();
    read_until_close(&mut stream, wait).await
}

/// Sends `request` on an HTTP/2 connection of its own, its body fed by
/// hand; returns the response's status and `x-switchyard-error`.
async fn h2_exchange(
    gw: &TestGateway,
    request: http::Request<common::Piped>,
) -> Result<(StatusCode, Option<String>), hyper::Error> {
    let mut sender = common::h2_connection(gw.addr).await;
    let request = request.map(common::AnyBody::new);
    let response = sender.send_request(request).await?;
    let error = response
        .headers()
        .get("x-switchyard-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((response.status(), error))
}

async fn read_until_close(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

// ----- admin token -----

async fn registry_writes_need_the_admin_token_and_reads_stay_open(way: Way) {
    let gw = TestGateway::start_way(
        &format!("{QUIET}[gateway]\nadmin_token = \"s3cret-token\"\n"),
        way,
    )
    .await;
    let body = json!({"name": "svc", "url": "http://127.0.0.1:9"}).to_string();
    let json_ct = ("content-type", "application/json");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-toke"),
        Some("Basic czNjcmV0"),
        Some("s3cret-token"),
    ] {
        let mut headers = vec![json_ct];
        if let Some(auth) = auth {
            headers.push(("authorization", auth));
        }
        let reply = gw.request(Method::POST, "/services", &body, &headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(reply.error_code(), "unauthorized");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    assert_eq!(
        gw.get("/services").await.json(),
        json!([]),
        "nothing changed"
    );

    let authed = [json_ct, ("authorization", "Bearer s3cret-token")];
    let reply = gw.request(Method::POST, "/services", &body, &authed).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    // Reads need nothing.
    assert_eq!(gw.get("/services/svc").await.status, StatusCode::OK);
    assert_eq!(gw.get("/services/svc/health").await.status, StatusCode::OK);
    // Deletes are writes too.
    let reply = gw.request(Method::DELETE, "/services/svc", "", &[]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = gw
        .request(
            Method::DELETE,
            "/services/svc/instances/127.0.0.1:9",
            "",
            &[("authorization", "Bearer nope")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        gw.get("/services/svc").await.status,
        StatusCode::OK,
        "still there"
    );
    let reply = gw
        .request(
            Method::DELETE,
            "/services/svc",
            "",
            &[("authorization", "bearer s3cret-token")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
}

// ----- upstream policy (SSRF) -----

async fn registration_refuses_addresses_outside_the_policy(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let own = format!("http://{}", gw.addr);
    let own_localhost_ip = format!("http://127.0.0.1:{}", gw.addr.port());
    let table = [
        "http://169.254.169.254/latest/meta-data",
        "http://2852039166",
        "http://0xA9FEA9FE",
        "http://0251.0376.0251.0376",
        "http://169.254.43518",
        "http://[::ffff:169.254.169.254]",
        "http://[::ffff:a9fe:a9fe]:80",
        "http://[fe80::1]:8080",
        "http://[fe80::abcd:1]",
        "http://0.0.0.0:8080",
        "http://0:8080",
        "http://[::]:8080",
        "http://224.0.0.1",
        "http://[ff02::1]",
        own.as_str(),
        own_localhost_ip.as_str(),
    ];
    for url in table {
        let reply = gw
            .post_json("/services", &json!({"name": "svc", "url": url}))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{url}: {}",
            reply.text()
        );
        assert_eq!(reply.error_code(), "upstream_forbidden", "{url}");
    }
    assert_eq!(
        gw.get("/services").await.json(),
        json!([]),
        "nothing registered"
    );
    // Ordinary addresses and hostnames are fine.
    gw.register("svc", "http://127.0.0.1:9").await;
    gw.register("svc", "http://localhost:10").await;
}

async fn an_allow_list_admits_only_its_networks(way: Way) {
    let gw = TestGateway::start_way(
        &format!("{QUIET}[upstreams]\nallow = [\"10.0.0.0/8\", \"127.0.0.1\"]\n"),
        way,
    )
    .await;
    gw.register("svc", "http://10.1.2.3:80").await;
    gw.register("svc", "http://127.0.0.1:9").await;
    for url in ["http://192.168.1.1", "http://127.0.0.2:9", "http://[::1]:9"] {
        let reply = gw
            .post_json("/services", &json!({"name": "svc", "url": url}))
            .await;
        assert_eq!(reply.error_code(), "upstream_forbidden", "{url}");
    }
}

async fn a_hostname_resolving_to_a_denied_address_is_refused_at_connect_time(way: Way) {
    // localhost resolves to loopback, which this policy denies. A high
    // failure threshold keeps the circuit closed, so every call reaches the
    // connect-time check (otherwise the circuit opens after three).
    let gw = TestGateway::start_way(
        "[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 1\n\
         [circuit_breaker]\nfailure_threshold = 100\n\
         [upstreams]\ndeny = [\"127.0.0.0/8\", \"::1/128\"]\n",
        way,
    )
    .await;
    let up = Echo::start("secret").await;
    let url = format!("http://localhost:{}", up.upstream.addr.port());
    // A hostname passes registration: it is checked once resolved.
    gw.register("svc", &url).await;
    for method in [Method::GET, Method::POST] {
        let reply = gw.request(method.clone(), "/call/svc/x", "", &[]).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{method}: {}",
            reply.text()
        );
        assert_eq!(reply.error_code(), "upstream_forbidden");
    }
    // Health checks go through the same door.
    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(up.hits(), 0, "nothing reached the denied address");
}

async fn redirects_are_passed_back_not_followed(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = common::Upstream::start(|_| async {
        let mut response = common::response(302, "");
        response.headers_mut().insert(
            "location",
            "http://169.254.169.254/latest/meta-data".parse().unwrap(),
        );
        response
    })
    .await;
    gw.register("svc", &up.url()).await;
    let reply = gw.get("/call/svc/go").await;
    assert_eq!(reply.status, StatusCode::FOUND);
    assert_eq!(
        reply.header("location"),
        Some("http://169.254.169.254/latest/meta-data")
    );
}

// ----- limits and timeouts -----

async fn max_connections_makes_new_connections_wait(way: Way) {
    let gw = TestGateway::start_way(&format!("{QUIET}[limits]\nmax_connections = 2\n"), way).await;
    if way == Way::H2c {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut sender = common::h2_connection(gw.addr).await;
            let (status, _) = h2_get(&mut sender, "/healthz").await.unwrap();
            assert_eq!(status, StatusCode::OK);
            held.push(sender);
        }
        // A third connection is not served while two are open ...
        let mut third = common::h2_connection(gw.addr).await;
        let mut answer = tokio::spawn(async move { h2_get(&mut third, "/healthz").await });
        let early = tokio::time::timeout(Duration::from_millis(300), &mut answer).await;
        assert!(early.is_err(), "served beyond max_connections");
        // ... and is as soon as one closes.
        drop(held.remove(0));
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("served once a connection closed")
            .unwrap()
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        return;
    }
    let mut first = gw.raw().await;
    let mut second = gw.raw().await;
    for stream in [&mut first, &mut second] {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    // A third connection is not served while two are open (its registry
    // call, when it makes one, goes in the same write) ...
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    let mut bytes = Vec::new();
    if way == Way::Warm {
        bytes.extend_from_slice(common::WARM_UP);
    }
    bytes.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    third.write_all(&bytes).await.unwrap();
    let mut buf = [0u8; 256];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond max_connections");
    // ... and is as soon as one closes.
    drop(first);
    let (reply, _) = read_until_close(&mut third, Duration::from_secs(10)).await;
    let answers = if way == Way::Warm { 2 } else { 1 };
    assert_eq!(reply.matches("HTTP/1.1 200").count(), answers, "{reply}");
    assert!(reply.contains("{\"status\":\"ok\"}"), "{reply}");
}

/// On Linux a connection that has sent nothing is not accepted yet (the
/// listener defers accept until the first bytes, for about a second), so
/// it holds no slot: with `max_connections = 1` and a silent connection
/// open, a request on a new connection, HTTP/1.1 and then HTTP/2, is
/// answered at once. Were the silent one accepted, the request would wait
/// for its `header_read_timeout` (30 s here).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_silent_connection_holds_no_connection_slot() {
    let gw = TestGateway::start_on_bound(&format!(
        "{QUIET}[limits]\nmax_connections = 1\nheader_read_timeout = \"30s\"\n"
    ))
    .await;
    let _silent = TcpStream::connect(gw.addr).await.unwrap();
    let mut http1 = gw.raw().await;
    http1
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (reply, _) = read_until_close(&mut http1, Duration::from_secs(10)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    drop(http1);
    let mut sender = common::h2_connection(gw.addr).await;
    let (status, _) =
        tokio::time::timeout(Duration::from_secs(10), h2_get(&mut sender, "/healthz"))
            .await
            .expect("answered while the silent connection waits")
            .unwrap();
    assert_eq!(status, StatusCode::OK);
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<common::AnyBody>,
    path: &str,
) -> Result<(StatusCode, Vec<u8>), hyper::Error> {
    use http_body_util::BodyExt;
    let request = http::Request::get(format!("http://gw{path}"))
        .body(http_body_util::combinators::UnsyncBoxBody::new(
            http_body_util::Empty::new().map_err(|never| match never {}),
        ))
        .unwrap();
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

// HTTP/1 only: the head of an HTTP/2 request is a HEADERS frame, not a
// stream of bytes a client can drip.
async fn a_slowloris_client_is_cut_off_by_header_read_timeout(way: Way) {
    let gw = TestGateway::start_way(
        &format!("{QUIET}[limits]\nheader_read_timeout = \"300ms\"\n"),
        way,
    )
    .await;
    let mut stream = gw.raw().await;
    let started = Instant::now();
    // One byte of the head every 50 ms: activity, but never a whole head.
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut cut_off = false;
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_off = true;
                break;
            }
            Ok(Ok(_)) => panic!("answered an incomplete head"),
            Err(_) => {}
        }
    }
    assert!(cut_off, "the slow head was never cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Other clients are served meanwhile.
    assert_eq!(gw.get("/healthz").await.status, StatusCode::OK);
}

async fn a_stalled_request_body_gets_408(way: Way) {
    let gw = TestGateway::start_way(
        &format!("{QUIET}[limits]\nbody_idle_timeout = \"300ms\"\n"),
        way,
    )
    .await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    let stalled = [
        // Registry write, body promised but not sent.
        "POST /services HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":",
        // Proxied, small (buffered) body.
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
        // Proxied, chunked body that stops mid-way.
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ];
    if way == Way::H2c {
        // The same three over HTTP/2: a promised length not sent, and a
        // body with no length that stops mid-way.
        for (path, length, sent) in [
            ("/services", Some("100"), &b"{\"name\":"[..]),
            ("/call/svc/x", Some("100"), b"0123456789"),
            ("/call/svc/x", None, b"hello"),
        ] {
            let (feed, body) = common::piped();
            feed.send(Bytes::from_static(sent));
            let mut request = http::Request::post(format!("http://gw{path}"))
                .header("content-type", "application/json");
            if let Some(length) = length {
                request = request.header("content-length", length);
            }
            let started = Instant::now();
            let (status, error) = h2_exchange(&gw, request.body(body).unwrap()).await.unwrap();
            assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{path}");
            assert_eq!(error.as_deref(), Some("request_timeout"));
            assert!(started.elapsed() >= Duration::from_millis(250));
            drop(feed);
        }
        assert_eq!(up.hits(), 0, "no stalled request was forwarded");
        return;
    }
    for request in stalled {
        let started = Instant::now();
        let (reply, _) = raw(&gw, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&reply), 408, "{request:?}: {reply}");
        assert!(
            reply.contains("x-switchyard-error: request_timeout"),
            "{reply}"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
    assert_eq!(up.hits(), 0, "no stalled request was forwarded");
}

async fn a_large_streamed_body_that_stalls_gets_408_and_is_never_completed_upstream(way: Way) {
    let gw = TestGateway::start_way(
        &format!("{QUIET}[limits]\nbody_idle_timeout = \"300ms\"\n"),
        way,
    )
    .await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    if way == Way::H2c {
        let (feed, body) = common::piped();
        feed.send(vec![b'x'; 200_000]);
        let request = http::Request::post("http://gw/call/svc/x")
            .header("content-length", "1000000")
            .body(body)
            .unwrap();
        let (status, _) = h2_exchange(&gw, request).await.unwrap();
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        drop(feed);
    } else {
        let mut request =
            b"POST /call/svc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".to_vec();
        request.extend(std::iter::repeat_n(b'x', 200_000));
        let (reply, _) = raw(&gw, &request, Duration::from_secs(5)).await;
        assert_eq!(status_of(&reply), 408, "{reply}");
    }
    // The body streamed as it came; it was never finished upstream.
    assert_eq!(up.complete.load(std::sync::atomic::Ordering::SeqCst), 0);
}

async fn oversized_heads_get_431(way: Way) {
    let gw =
        TestGateway::start_way(&format!("{QUIET}[limits]\nmax_header_bytes = 16384\n"), way).await;
    let big = "a".repeat(20_000);
    if way == Way::H2c {
        let reply = gw
            .request(Method::GET, "/healthz", "", &[("x-big", &big)])
            .await;
        assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let reply = gw
            .request(Method::GET, "/healthz", "", &[("x-big", &big[..8000])])
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        return;
    }
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let (reply, _) = raw(&gw, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&reply), 431, "{reply}");
    // A head under the limit is fine.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        &big[..8000]
    );
    let (reply, _) = raw(&gw, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&reply), 200, "{reply}");
}

async fn registry_quotas_give_429_and_keep_what_exists(way: Way) {
    let gw = TestGateway::start_way(
        &format!("{QUIET}[limits]\nmax_instances = 3\nmax_instances_per_service = 2\n"),
        way,
    )
    .await;
    gw.register("a", "http://127.0.0.1:1").await;
    gw.register("a", "http://127.0.0.1:2").await;
    let reply = gw
        .post_json(
            "/services",
            &json!({"name": "a", "url": "http://127.0.0.1:3"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.error_code(), "limit_exceeded");
    gw.register("b", "http://127.0.0.1:1").await;
    let reply = gw
        .post_json(
            "/services",
            &json!({"name": "c", "url": "http://127.0.0.1:1"}),
        )
        .await;
    assert_eq!(reply.error_code(), "limit_exceeded");
    let services = gw.get("/services").await.json();
    assert_eq!(services.as_array().unwrap().len(), 2);
    assert_eq!(
        gw.get("/services/a").await.json()["instances"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

// ----- framing and routing hygiene -----
//
// The framing cases are HTTP/1 only: HTTP/2 frames every body itself and
// has neither Transfer-Encoding nor absolute-form targets; its CONNECT is
// another method altogether.

async fn both_content_length_and_transfer_encoding_are_refused_and_nothing_is_smuggled(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    for request in [
        // CL first, chunked body that ends at once, then a smuggled request.
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /call/svc/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        // TE first, odd case.
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /call/svc/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        // On a registry path too.
        "POST /services HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let (reply, closed) = raw(&gw, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&reply), 400, "{reply}");
        assert!(reply.contains("x-switchyard-error: bad_request"), "{reply}");
        assert_eq!(
            reply.matches("HTTP/1.1 ").count(),
            1,
            "one response only: {reply}"
        );
        assert!(closed, "the connection is closed after it");
    }
    assert_eq!(
        up.hits(),
        0,
        "neither the request nor the smuggled one was forwarded"
    );
    // A request that comes first on the same connection is unaffected.
    let request = "GET /call/svc/fine HTTP/1.1\r\nHost: x\r\n\r\nPOST /call/svc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let (reply, _) = raw(&gw, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 400").count(), 1, "{reply}");
    assert_eq!(up.hits(), 1);
}

async fn upstreams_never_see_both_framing_headers(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    // Chunked in: forwarded with one framing header only.
    let request = "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let (reply, _) = raw(&gw, request.as_bytes(), Duration::from_secs(5)).await;
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    let echo: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{reply}"));
    let headers = echo["headers"].as_object().unwrap();
    assert_eq!(echo["body_len"], 5);
    assert!(
        !(headers.contains_key("content-length") && headers.contains_key("transfer-encoding")),
        "{headers:?}"
    );
}

async fn invalid_chunking_is_refused_without_forwarding(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    for request in [
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    ] {
        let (reply, _) = raw(&gw, request.as_bytes(), Duration::from_secs(5)).await;
        let status = status_of(&reply);
        assert!((400..500).contains(&status), "{request:?}: {reply}");
    }
    assert_eq!(up.hits(), 0);
}

async fn absolute_form_asterisk_and_connect_targets_are_refused(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    for (request, status) in [
        (
            "GET http://evil.example/call/svc/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            404,
        ),
        (
            "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\nConnection: close\r\n\r\n",
            405,
        ),
        (
            "CONNECT /call/svc/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            405,
        ),
    ] {
        let (reply, _) = raw(&gw, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&reply), status, "{request:?}: {reply}");
        assert!(reply.contains("x-switchyard-error:"), "{reply}");
    }
    assert_eq!(up.hits(), 0);
}

async fn via_is_added_and_loops_get_508(way: Way) {
    let gw = TestGateway::start_way(&format!("{QUIET}[gateway]\nname = \"edge-1\"\n"), way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    let echo = gw
        .request(Method::GET, "/call/svc/x", "", &[("via", "1.0 corp-proxy")])
        .await
        .json();
    assert_eq!(
        echo["headers"]["via"],
        json!(["1.0 corp-proxy, 1.1 edge-1"])
    );
    let reply = gw
        .request(
            Method::GET,
            "/call/svc/x",
            "",
            &[("via", "1.1 other, 1.1 edge-1")],
        )
        .await;
    assert_eq!(reply.status, StatusCode::LOOP_DETECTED);
    assert_eq!(reply.error_code(), "loop_detected");
    assert_eq!(up.hits(), 1);
}

async fn a_gateway_registered_behind_itself_by_hostname_is_caught(way: Way) {
    // Registering the gateway's own address as an IP is refused outright;
    // by hostname it passes registration, and the connect-time check stops it.
    let gw = TestGateway::start_way(QUIET, way).await;
    gw.register("me", &format!("http://localhost:{}", gw.addr.port()))
        .await;
    let reply = gw.get("/call/me/x").await;
    assert!(
        matches!(
            reply.error_code().as_str(),
            "upstream_forbidden" | "loop_detected"
        ),
        "{}",
        reply.text()
    );
}

// ----- a client cannot hurt an instance -----
//
// SPEC §5: a request that fails through its client's fault (upload
// aborted or stalled) is not the instance's failure. Bodies of 70 000
// bytes: past max_replay_body_bytes, so they stream to the instance as
// they come, and the instance's exchange is under way when the client
// fails it.

const BREAKER: &str = "[health_check]\ninterval = \"0s\"\n[circuit_breaker]\nfailure_threshold = 3\n[limits]\nbody_idle_timeout = \"300ms\"\n";

const UPLOAD_HEAD: &[u8] =
    b"POST /call/svc/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n";

fn upload_request(body: common::Piped) -> http::Request<common::Piped> {
    http::Request::post("http://gw/call/svc/upload")
        .header("content-length", "100000")
        .body(body)
        .unwrap()
}

async fn assert_instance_unharmed(gw: &TestGateway) {
    let service = gw.get("/services/svc").await.json();
    let instance = &service["instances"][0];
    assert_eq!(
        (
            instance["circuit"].as_str(),
            instance["consecutive_failures"].as_u64()
        ),
        (Some("closed"), Some(0)),
        "{instance}"
    );
    let reply = gw.get("/call/svc/after").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

async fn uploads_the_client_aborts_do_not_open_the_instances_circuit(way: Way) {
    let gw = TestGateway::start_way(BREAKER, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    for i in 1..=3 {
        if way.is_http1() {
            let mut stream = gw.raw().await;
            stream.write_all(UPLOAD_HEAD).await.unwrap();
            stream.write_all(&vec![b'x'; 70_000]).await.unwrap();
            common::eventually(Duration::from_secs(5), "the upload under way", || async {
                up.hits() == i
            })
            .await;
            // The client goes (half-closing, so the gateway's answer, if
            // any, and its close can be waited for).
            stream.shutdown().await.unwrap();
            let (_, closed) = read_until_close(&mut stream, Duration::from_secs(10)).await;
            assert!(closed, "the gateway closes the aborted exchange");
        } else {
            let mut sender = common::h2_connection(gw.addr).await;
            let (feed, body) = common::piped();
            feed.send(vec![b'x'; 70_000]);
            let answer =
                tokio::spawn(sender.send_request(upload_request(body).map(common::AnyBody::new)));
            common::eventually(Duration::from_secs(5), "the upload under way", || async {
                up.hits() == i
            })
            .await;
            // The client resets the stream.
            drop(feed);
            let _ = tokio::time::timeout(Duration::from_secs(10), answer)
                .await
                .expect("the stream ends");
        }
        common::eventually(
            Duration::from_secs(5),
            "the instance saw the upload break",
            || async { up.broken() == i },
        )
        .await;
    }
    assert_instance_unharmed(&gw).await;
}

async fn uploads_that_stall_do_not_open_the_instances_circuit(way: Way) {
    let gw = TestGateway::start_way(BREAKER, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    for i in 1..=3 {
        if way.is_http1() {
            let mut stream = gw.raw().await;
            stream.write_all(UPLOAD_HEAD).await.unwrap();
            stream.write_all(&vec![b'x'; 70_000]).await.unwrap();
            let mut read = Vec::new();
            let mut buf = [0u8; 4096];
            while common::responses(&read).is_empty() {
                let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                    .await
                    .expect("an answer within 10 s")
                    .unwrap_or(0);
                assert!(
                    n > 0,
                    "closed without an answer: {:?}",
                    String::from_utf8_lossy(&read)
                );
                read.extend_from_slice(&buf[..n]);
            }
            assert_eq!(
                common::responses(&read)[0].status,
                408,
                "{}",
                String::from_utf8_lossy(&read)
            );
        } else {
            let (feed, body) = common::piped();
            feed.send(vec![b'x'; 70_000]);
            let (status, _) = h2_exchange(&gw, upload_request(body)).await.unwrap();
            assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
            drop(feed);
        }
        assert_eq!(up.hits(), i, "the upload was under way");
    }
    assert_instance_unharmed(&gw).await;
}

each_way! {
    registry_writes_need_the_admin_token_and_reads_stay_open,
    registration_refuses_addresses_outside_the_policy,
    an_allow_list_admits_only_its_networks,
    a_hostname_resolving_to_a_denied_address_is_refused_at_connect_time,
    redirects_are_passed_back_not_followed,
    max_connections_makes_new_connections_wait,
    a_stalled_request_body_gets_408,
    a_large_streamed_body_that_stalls_gets_408_and_is_never_completed_upstream,
    oversized_heads_get_431,
    registry_quotas_give_429_and_keep_what_exists,
    via_is_added_and_loops_get_508,
    a_gateway_registered_behind_itself_by_hostname_is_caught,
    uploads_the_client_aborts_do_not_open_the_instances_circuit,
    uploads_that_stall_do_not_open_the_instances_circuit;
    http1:
    a_slowloris_client_is_cut_off_by_header_read_timeout,
    both_content_length_and_transfer_encoding_are_refused_and_nothing_is_smuggled,
    upstreams_never_see_both_framing_headers,
    invalid_chunking_is_refused_without_forwarding,
    absolute_form_asterisk_and_connect_targets_are_refused,
}
