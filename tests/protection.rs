//! Protection end to end (SPEC §6): the admin token, the upstream policy
//! against SSRF, limits against slow and hostile clients, and framing and
//! routing hygiene. Framing cases are raw bytes written to a socket.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Echo, TestGateway};
use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

/// Writes `bytes`, then reads until the server closes or `wait` passes.
/// Returns what was read and whether the server closed the connection.
async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_until_close(&mut stream, wait).await
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

#[tokio::test]
async fn registry_writes_need_the_admin_token_and_reads_stay_open() {
    let gw = TestGateway::start(&format!(
        "{QUIET}[gateway]\nadmin_token = \"s3cret-token\"\n"
    ))
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

#[tokio::test]
async fn registration_refuses_addresses_outside_the_policy() {
    let gw = TestGateway::start(QUIET).await;
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

#[tokio::test]
async fn an_allow_list_admits_only_its_networks() {
    let gw = TestGateway::start(&format!(
        "{QUIET}[upstreams]\nallow = [\"10.0.0.0/8\", \"127.0.0.1\"]\n"
    ))
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

#[tokio::test]
async fn a_hostname_resolving_to_a_denied_address_is_refused_at_connect_time() {
    // localhost resolves to loopback, which this policy denies. A high
    // failure threshold keeps the circuit closed, so every call reaches the
    // connect-time check (otherwise the circuit opens after three).
    let gw = TestGateway::start(
        "[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 1\n\
         [circuit_breaker]\nfailure_threshold = 100\n\
         [upstreams]\ndeny = [\"127.0.0.0/8\", \"::1/128\"]\n",
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

#[tokio::test]
async fn redirects_are_passed_back_not_followed() {
    let gw = TestGateway::start(QUIET).await;
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

#[tokio::test]
async fn max_connections_makes_new_connections_wait() {
    let gw = TestGateway::start(&format!("{QUIET}[limits]\nmax_connections = 2\n")).await;
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    let mut second = TcpStream::connect(gw.addr).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    // A third connection is not served while two are open ...
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond max_connections");
    // ... and is as soon as one closes.
    drop(first);
    let (reply, _) = read_until_close(&mut third, Duration::from_secs(10)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_by_header_read_timeout() {
    let gw = TestGateway::start(&format!(
        "{QUIET}[limits]\nheader_read_timeout = \"300ms\"\n"
    ))
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
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

#[tokio::test]
async fn a_stalled_request_body_gets_408() {
    let gw = TestGateway::start(&format!("{QUIET}[limits]\nbody_idle_timeout = \"300ms\"\n")).await;
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
    for request in stalled {
        let started = Instant::now();
        let (reply, _) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&reply), 408, "{request:?}: {reply}");
        assert!(
            reply.contains("x-switchyard-error: request_timeout"),
            "{reply}"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
    assert_eq!(up.hits(), 0, "no stalled request was forwarded");
}

#[tokio::test]
async fn a_large_streamed_body_that_stalls_gets_408_and_is_never_completed_upstream() {
    let gw = TestGateway::start(&format!("{QUIET}[limits]\nbody_idle_timeout = \"300ms\"\n")).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    let mut request =
        b"POST /call/svc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    request.extend(std::iter::repeat_n(b'x', 200_000));
    let (reply, _) = raw(gw.addr, &request, Duration::from_secs(5)).await;
    assert_eq!(status_of(&reply), 408, "{reply}");
    // The body streamed as it came; it was never finished upstream.
    assert_eq!(up.complete.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn oversized_heads_get_431() {
    let gw = TestGateway::start(&format!("{QUIET}[limits]\nmax_header_bytes = 16384\n")).await;
    let big = "a".repeat(20_000);
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let (reply, _) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&reply), 431, "{reply}");
    // A head under the limit is fine.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        &big[..8000]
    );
    let (reply, _) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&reply), 200, "{reply}");
}

#[tokio::test]
async fn registry_quotas_give_429_and_keep_what_exists() {
    let gw = TestGateway::start(&format!(
        "{QUIET}[limits]\nmax_instances = 3\nmax_instances_per_service = 2\n"
    ))
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

#[tokio::test]
async fn both_content_length_and_transfer_encoding_are_refused_and_nothing_is_smuggled() {
    let gw = TestGateway::start(QUIET).await;
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
        let (reply, closed) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
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
    let (reply, _) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 400").count(), 1, "{reply}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn upstreams_never_see_both_framing_headers() {
    let gw = TestGateway::start(QUIET).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    // Chunked in: forwarded with one framing header only.
    let request = "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let (reply, _) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    let echo: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{reply}"));
    let headers = echo["headers"].as_object().unwrap();
    assert_eq!(echo["body_len"], 5);
    assert!(
        !(headers.contains_key("content-length") && headers.contains_key("transfer-encoding")),
        "{headers:?}"
    );
}

#[tokio::test]
async fn invalid_chunking_is_refused_without_forwarding() {
    let gw = TestGateway::start(QUIET).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    for request in [
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        "POST /call/svc/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    ] {
        let (reply, _) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
        let status = status_of(&reply);
        assert!((400..500).contains(&status), "{request:?}: {reply}");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn absolute_form_asterisk_and_connect_targets_are_refused() {
    let gw = TestGateway::start(QUIET).await;
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
        let (reply, _) = raw(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&reply), status, "{request:?}: {reply}");
        assert!(reply.contains("x-switchyard-error:"), "{reply}");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn via_is_added_and_loops_get_508() {
    let gw = TestGateway::start(&format!("{QUIET}[gateway]\nname = \"edge-1\"\n")).await;
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

#[tokio::test]
async fn a_gateway_registered_behind_itself_by_hostname_is_caught() {
    // Registering the gateway's own address as an IP is refused outright;
    // by hostname it passes registration, and the connect-time check stops it.
    let gw = TestGateway::start(QUIET).await;
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
