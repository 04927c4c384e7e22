//! The proxy path end to end (SPEC §5): real upstreams, the real gateway,
//! HTTP over sockets. Instances die, hang and fail; clients keep getting
//! answers.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Echo, Hang, Reply, TestGateway, Way, dead_url, each_way, eventually};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;

/// Health checks off: these tests are about the proxy path.
const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

async fn register_id(gw: &TestGateway, name: &str, url: &str, id: &str) {
    let reply = gw
        .post_json("/services", &json!({"name": name, "url": url, "id": id}))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
}

async fn instance(gw: &TestGateway, service: &str, id: &str) -> serde_json::Value {
    gw.get(&format!("/services/{service}/instances/{id}"))
        .await
        .json()
}

fn ok_count(replies: &[Reply]) -> usize {
    replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count()
}

async fn forwards_method_path_query_body_and_headers_faithfully(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    register_id(&gw, "users", &up.url(), "users-1").await;

    let path = "/call/users/a%20b/c%2Fd/%7Euser/x;p=1?q=%2F&z=a+b&&empty=#";
    let request = Request::builder()
        .method(Method::PATCH)
        .uri(gw.url(path.trim_end_matches('#')))
        .header("host", "gateway.example:8080")
        .header("connection", "x-hop-by-hop")
        .header("x-hop-by-hop", "must go")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("trailer", "x-sum")
        .header("upgrade", "h2c")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-end-to-end", "stays")
        .header("x-request-id", "req-42")
        .body(Full::new(Bytes::from_static(b"hello body")))
        .unwrap();
    let reply = gw.send(request).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("x-switchyard-upstream"), Some("users-1"));
    assert_eq!(reply.header("x-switchyard-error"), None);
    let echo = reply.json();
    assert_eq!(echo["method"], "PATCH");
    assert_eq!(
        echo["uri"],
        "/a%20b/c%2Fd/%7Euser/x;p=1?q=%2F&z=a+b&&empty="
    );
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["body_len"], 10);
    let h = &echo["headers"];
    assert_eq!(h["host"], json!([up.upstream.addr.to_string()]));
    assert_eq!(h["x-forwarded-for"], json!(["203.0.113.9, 127.0.0.1"]));
    assert_eq!(h["x-forwarded-proto"], json!(["http"]));
    assert_eq!(h["x-forwarded-host"], json!(["gateway.example:8080"]));
    assert_eq!(h["x-request-id"], json!(["req-42"]));
    assert_eq!(h["x-end-to-end"], json!(["stays"]));
    for gone in [
        "x-hop-by-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded: {h}");
    }

    // Without an id, one is made up; each request gets its own.
    let a = gw.get("/call/users/").await.json();
    let b = gw.get("/call/users/").await.json();
    let (a, b) = (
        &a["headers"]["x-request-id"][0],
        &b["headers"]["x-request-id"][0],
    );
    assert!(a.as_str().is_some_and(|id| id.len() == 36), "{a}");
    assert_ne!(a, b);
}

async fn response_hop_by_hop_headers_are_removed(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = common::Upstream::start(|_| async {
        let mut response = common::response(201, "made");
        let h = response.headers_mut();
        h.insert("connection", "x-private".parse().unwrap());
        h.insert("x-private", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-public", "yes".parse().unwrap());
        response
    })
    .await;
    gw.register("svc", &up.url()).await;
    let reply = gw.get("/call/svc/x").await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.text(), "made");
    assert_eq!(reply.header("x-public"), Some("yes"));
    assert_eq!(reply.header("x-private"), None);
    assert_eq!(reply.header("keep-alive"), None);
    assert_eq!(
        reply.header("x-switchyard-upstream"),
        Some(up.addr.to_string().as_str())
    );
}

async fn the_instance_base_path_prefixes_the_rest(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    gw.register("api", &format!("{}/api/v1/", up.url())).await;
    for (call, upstream) in [
        ("/call/api/users?x=1", "/api/v1/users?x=1"),
        ("/call/api", "/api/v1"),
        ("/call/api/", "/api/v1/"),
        ("/call/api?q", "/api/v1?q"),
    ] {
        let reply = gw.get(call).await;
        assert_eq!(reply.json()["uri"], upstream, "{call}");
    }
    let root = Echo::start("b").await;
    gw.register("root", &root.url()).await;
    assert_eq!(gw.get("/call/root").await.json()["uri"], "/");
}

async fn bad_targets_are_refused_and_reach_no_upstream(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    for (path, status, code) in [
        ("/call/svc/a/../b", 400, "invalid_path"),
        ("/call/svc/%2e%2e/etc", 400, "invalid_path"),
        ("/call/svc/a%2F..%2Fb", 400, "invalid_path"),
        ("/call/svc/./x", 400, "invalid_path"),
        ("/call/Svc/x", 400, "invalid_name"),
        ("/call/", 404, "not_found"),
        ("/call/nobody/x", 503, "no_healthy_instance"),
    ] {
        let reply = gw.get(path).await;
        assert_eq!(reply.status.as_u16(), status, "{path}: {}", reply.text());
        assert_eq!(reply.error_code(), code, "{path}");
    }
    assert_eq!(up.hits(), 0);
}

async fn every_client_is_forwarded_as_http1_1(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    let echo = gw.get("/call/svc/h2?x").await.json();
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["uri"], "/h2?x");
    assert_eq!(
        echo["headers"]["x-forwarded-host"],
        json!([gw.addr.to_string()])
    );
}

async fn a_dead_instance_among_three_costs_no_request(way: Way) {
    let gw = TestGateway::start_seeded_way(QUIET, 7, way).await;
    let a = Echo::start("a").await;
    let c = Echo::start("c").await;
    register_id(&gw, "svc", &a.url(), "a").await;
    register_id(&gw, "svc", &dead_url().await, "dead").await;
    register_id(&gw, "svc", &c.url(), "c").await;
    let mut replies = Vec::new();
    for i in 0..60 {
        replies.push(gw.get(&format!("/call/svc/get/{i}")).await);
        let body = format!("payload {i}");
        replies.push(
            gw.request(
                Method::POST,
                &format!("/call/svc/post/{i}"),
                &body,
                &[("content-type", "text/plain")],
            )
            .await,
        );
    }
    assert_eq!(ok_count(&replies), 120, "every GET and POST succeeded");
    for reply in replies.iter().filter(|r| r.json()["method"] == "POST") {
        assert!(
            reply.json()["body_len"].as_u64().unwrap() >= 9,
            "the body went along"
        );
    }
    assert_eq!(a.hits() + c.hits(), 120, "each request answered once");
    let dead = instance(&gw, "svc", "dead").await;
    assert_eq!(dead["circuit"], "open", "{dead}");
    assert!(dead["consecutive_failures"].as_u64().unwrap() >= 3);
}

async fn an_instance_answering_503_is_retried_around_for_idempotent_calls(way: Way) {
    let gw = TestGateway::start_seeded_way(
        &format!("{QUIET}[circuit_breaker]\nfailure_threshold = 1000\n"),
        11,
        way,
    )
    .await;
    let good = [Echo::start("a").await, Echo::start("b").await];
    let bad = Echo::start("bad").await;
    bad.set_status(503);
    for (i, up) in good.iter().enumerate() {
        register_id(&gw, "svc", &up.url(), &format!("good-{i}")).await;
    }
    register_id(&gw, "svc", &bad.url(), "bad").await;
    let mut replies = Vec::new();
    for _ in 0..60 {
        replies.push(gw.get("/call/svc/x").await);
        replies.push(gw.request(Method::DELETE, "/call/svc/x", "", &[]).await);
        replies.push(
            gw.request(
                Method::POST,
                "/call/svc/x",
                "{}",
                &[("idempotency-key", "k-1")],
            )
            .await,
        );
    }
    assert_eq!(ok_count(&replies), 180);
    assert!(bad.hits() > 0, "the bad instance was tried");

    // A plain POST is not retried: it gets the upstream's 503 as it is.
    let mut seen_503 = false;
    for _ in 0..60 {
        let reply = gw.request(Method::POST, "/call/svc/x", "{}", &[]).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(
                reply.header("x-switchyard-error"),
                None,
                "the upstream's own answer"
            );
            assert_eq!(reply.header("x-switchyard-upstream"), Some("bad"));
            seen_503 = true;
        }
    }
    assert!(seen_503);
}

async fn an_instance_answering_500_trips_its_circuit_is_avoided_and_recovers(way: Way) {
    let gw = TestGateway::start_seeded_way(
        &format!("{QUIET}[circuit_breaker]\nfailure_threshold = 3\nreset_timeout = \"1s\"\n"),
        3,
        way,
    )
    .await;
    let good = [Echo::start("a").await, Echo::start("b").await];
    let bad = Echo::start("bad").await;
    bad.set_status(500);
    for (i, up) in good.iter().enumerate() {
        register_id(&gw, "svc", &up.url(), &format!("good-{i}")).await;
    }
    register_id(&gw, "svc", &bad.url(), "bad").await;

    // 500 is not in retry_on_status: until the circuit opens the client sees
    // the instance's 500s, but the one that opens it is retried elsewhere.
    let mut failures = 0;
    let mut last_sent = Instant::now();
    for _ in 0..200 {
        last_sent = Instant::now();
        let reply = gw.get("/call/svc/x").await;
        if reply.status != StatusCode::OK {
            assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
            failures += 1;
        }
        if bad.hits() >= 3 {
            break;
        }
    }
    assert_eq!(bad.hits(), 3);
    assert_eq!(
        failures, 2,
        "the third failure opened the circuit and was retried"
    );
    let state = instance(&gw, "svc", "bad").await;
    assert_eq!(
        (
            state["circuit"].as_str(),
            state["consecutive_failures"].as_u64()
        ),
        (Some("open"), Some(3))
    );

    // Open: traffic avoids it, for as long as the circuit is sure to stay
    // open (it opened after `last_sent`; a loaded machine may leave time
    // for only some of these).
    for _ in 0..30 {
        if last_sent.elapsed() >= Duration::from_millis(800) {
            break;
        }
        assert_eq!(gw.get("/call/svc/x").await.status, StatusCode::OK);
    }
    assert_eq!(bad.hits(), 3);

    // After reset_timeout a client request probes it; the probe fails, and
    // the request is retried elsewhere: the client never sees that 500.
    eventually(Duration::from_secs(10), "a half-open probe", || async {
        assert_eq!(gw.get("/call/svc/x").await.status, StatusCode::OK);
        bad.hits() == 4
    })
    .await;
    assert_eq!(
        instance(&gw, "svc", "bad").await["circuit"],
        "open",
        "the failed probe re-opened it"
    );

    // Fixed, it gets a probe once reset_timeout has passed, and closes.
    bad.set_status(200);
    eventually(Duration::from_secs(10), "the circuit closes", || async {
        assert_eq!(gw.get("/call/svc/x").await.status, StatusCode::OK);
        instance(&gw, "svc", "bad").await["circuit"] == "closed"
    })
    .await;
    assert_eq!(instance(&gw, "svc", "bad").await["consecutive_failures"], 0);
}

async fn with_500_in_retry_on_status_idempotent_calls_never_see_it(way: Way) {
    let gw = TestGateway::start_seeded_way(
        &format!("{QUIET}[retry]\nretry_on_status = [500, 502, 503, 504]\n"),
        5,
        way,
    )
    .await;
    let good = [Echo::start("a").await, Echo::start("b").await];
    let bad = Echo::start("bad").await;
    bad.set_status(500);
    for up in good.iter().chain([&bad]) {
        gw.register("svc", &up.url()).await;
    }
    let mut replies = Vec::new();
    for _ in 0..90 {
        replies.push(gw.get("/call/svc/x").await);
    }
    assert_eq!(ok_count(&replies), 90);
    assert!(bad.hits() >= 1, "the failing instance was tried");
}

async fn a_hanging_instance_times_out_and_is_retried_around(way: Way) {
    // 900ms for the whole request, so 300ms per attempt.
    let gw = TestGateway::start_seeded_way(
        &format!("{QUIET}[proxy]\nrequest_timeout = \"900ms\"\n"),
        21,
        way,
    )
    .await;
    let hang = Hang::start().await;
    let good = [Echo::start("a").await, Echo::start("b").await];
    register_id(&gw, "svc", &hang.url(), "hang").await;
    for (i, up) in good.iter().enumerate() {
        register_id(&gw, "svc", &up.url(), &format!("good-{i}")).await;
    }
    for _ in 0..30 {
        let started = Instant::now();
        let reply = gw.get("/call/svc/x").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let state = instance(&gw, "svc", "hang").await;
    assert!(hang.connections.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(
        state["circuit"], "open",
        "three timeouts opened it: {state}"
    );
}

async fn everything_hanging_gives_504_within_the_request_timeout(way: Way) {
    let gw = TestGateway::start_way(
        &format!("{QUIET}[proxy]\nrequest_timeout = \"600ms\"\n"),
        way,
    )
    .await;
    let hangs = [Hang::start().await, Hang::start().await];
    for h in &hangs {
        gw.register("svc", &h.url()).await;
    }
    for method in [Method::GET, Method::POST] {
        let started = Instant::now();
        let reply = gw.request(method.clone(), "/call/svc/x", "", &[]).await;
        let took = started.elapsed();
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{method}");
        assert_eq!(reply.error_code(), "upstream_timeout");
        assert!(took >= Duration::from_millis(190), "{method}: {took:?}");
        assert!(took < Duration::from_secs(3), "{method}: {took:?}");
    }
}

async fn all_dead_gives_502_upstream_unreachable(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    gw.register("svc", &dead_url().await).await;
    gw.register("svc", &dead_url().await).await;
    let reply = gw.get("/call/svc/x").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.error_code(), "upstream_unreachable");
}

async fn when_everything_fails_the_budget_caps_amplification(way: Way) {
    // Circuits never open here, so only the budget limits the retries.
    let gw = TestGateway::start_way(&format!(
        "{QUIET}[circuit_breaker]\nfailure_threshold = 1000\n[retry]\nbudget_ratio = 0.2\nbudget_min_per_sec = 1\nbackoff_base = \"0s\"\nbackoff_max = \"0s\"\n"
    ), way)
    .await;
    let ups = [
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    ];
    for up in &ups {
        up.set_status(503);
        gw.register("svc", &up.url()).await;
    }
    let requests = 300;
    for _ in 0..requests {
        let reply = gw.get("/call/svc/x").await;
        // The last upstream answer, as it is.
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.header("x-switchyard-error"), None);
    }
    let hits: usize = ups.iter().map(Echo::hits).sum();
    // 20% of 300 plus the 1/s reserve over 10 s; without a budget it would be 900.
    assert!(hits >= requests, "{hits}");
    assert!(
        hits <= requests + requests / 5 + 10,
        "amplification not capped: {hits} upstream hits"
    );
}

async fn every_circuit_open_gives_503_circuit_open_with_retry_after(way: Way) {
    let gw = TestGateway::start_way(
        &format!("{QUIET}[circuit_breaker]\nfailure_threshold = 1\nreset_timeout = \"30s\"\n"),
        way,
    )
    .await;
    let bad = Echo::start("bad").await;
    bad.set_status(500);
    gw.register("svc", &bad.url()).await;
    // The failure that opens the circuit has no other instance to go to.
    assert_eq!(
        gw.get("/call/svc/x").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let reply = gw.get("/call/svc/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "circuit_open");
    let wait: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&wait), "{wait}");
    assert_eq!(bad.hits(), 1);
    // The health endpoint agrees: nothing routable.
    assert_eq!(
        gw.get("/services/svc/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

async fn all_unhealthy_gives_503_no_healthy_instance(way: Way) {
    let gw = TestGateway::start_way(
        "[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 1\n",
        way,
    )
    .await;
    let up = Echo::start("a").await;
    up.set_status(500);
    gw.register("svc", &up.url()).await;
    gw.get("/services/svc/health?refresh=true").await;
    let hits = up.hits();
    let reply = gw.get("/call/svc/x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "no_healthy_instance");
    assert_eq!(up.hits(), hits, "no request reached it");
}

async fn bodies_stream_both_ways_and_survive_a_connect_failure(way: Way) {
    let gw = TestGateway::start_seeded_way(QUIET, 1, way).await;
    let up = Echo::start("a").await;
    register_id(&gw, "svc", &dead_url().await, "dead").await;
    register_id(&gw, "svc", &up.url(), "live").await;
    // Small (replayed) and large (streamed once) bodies, each sent many
    // times so some first attempts go to the dead instance.
    for size in [10usize, 65_536, 65_537, 3 << 20] {
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
        for _ in 0..6 {
            let request = Request::post(gw.url("/call/svc/upload"))
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap();
            let reply = gw.send(request).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "size {size}: {}",
                reply.text()
            );
            let echo = reply.json();
            assert_eq!(echo["body_len"], size, "size {size}");
            assert_eq!(echo["body_sum"], sum, "size {size}");
        }
    }
    // A chunked upload with no Content-Length.
    for chunks in [1usize, 40] {
        let request = Request::post(gw.url("/call/svc/chunked"))
            .body(common::Chunks::new(chunks, 8192))
            .unwrap();
        let reply = gw.send(request).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["body_len"], chunks * 8192);
    }
}

async fn large_responses_stream_through(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let size = 16 << 20;
    let up =
        common::Upstream::start(move |_| async move { common::response(200, vec![7u8; size]) })
            .await;
    gw.register("svc", &up.url()).await;
    let reply = gw.get("/call/svc/big").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), size);
    assert!(reply.body.iter().all(|&b| b == 7));
}

async fn per_service_overrides_apply_to_static_and_registered_instances(way: Way) {
    let live = Echo::start("live").await;
    let dead = dead_url().await;
    let config = format!(
        "{QUIET}[[services]]\nname = \"strict\"\nurls = [\"{dead}\", \"{}\"]\n\
         [services.retry]\nmax_attempts = 1\n[services.circuit_breaker]\nfailure_threshold = 1\n",
        live.url()
    );
    let gw = TestGateway::start_seeded_way(&config, 9, way).await;
    // The same two instances under a service without overrides.
    gw.register("lenient", &dead).await;
    gw.register("lenient", &live.url()).await;
    let mut lenient_failures = 0;
    for _ in 0..20 {
        if gw.get("/call/lenient/x").await.status != StatusCode::OK {
            lenient_failures += 1;
        }
    }
    assert_eq!(
        lenient_failures, 0,
        "default retries cover the dead instance"
    );

    // No retries for "strict": the request that meets the dead instance fails,
    // and one failure opens its circuit.
    let mut strict = Vec::new();
    for _ in 0..20 {
        strict.push(gw.get("/call/strict/x").await);
    }
    let failed: Vec<_> = strict
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .collect();
    assert_eq!(failed.len(), 1, "exactly the one request that met it");
    assert_eq!(failed[0].error_code(), "upstream_unreachable");
    let id = dead.trim_start_matches("http://");
    let state = instance(&gw, "strict", id).await;
    assert_eq!(
        (
            state["circuit"].as_str(),
            state["consecutive_failures"].as_u64()
        ),
        (Some("open"), Some(1))
    );

    // An instance registered later under "strict" gets its overrides too.
    let other_dead = dead_url().await;
    gw.register("strict", &other_dead).await;
    let mut failures = 0;
    for _ in 0..40 {
        if gw.get("/call/strict/x").await.status != StatusCode::OK {
            failures += 1;
        }
    }
    assert_eq!(failures, 1);
    let id = other_dead.trim_start_matches("http://");
    assert_eq!(instance(&gw, "strict", id).await["circuit"], "open");
}

async fn upstream_connections_are_kept_alive_and_reused(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Echo::start("a").await;
    let sized =
        common::Upstream::start(|_| async { common::response(200, "exactly 17 bytes.") }).await;
    let empty = common::Upstream::start(|_| async { common::response(204, "") }).await;
    gw.register("echo", &up.url()).await;
    gw.register("sized", &sized.url()).await;
    gw.register("empty", &empty.url()).await;
    for i in 0..50 {
        let body = "x".repeat(i);
        assert_eq!(
            gw.request(Method::POST, "/call/echo/x", &body, &[])
                .await
                .status,
            StatusCode::OK
        );
        assert_eq!(gw.get("/call/sized/x").await.body.len(), 17);
        assert_eq!(gw.get("/call/empty/x").await.status, StatusCode::NO_CONTENT);
    }
    // Sequential calls: one connection each, reused for all fifty.
    assert_eq!(up.upstream.connections(), 1);
    assert_eq!(sized.connections(), 1);
    assert_eq!(empty.connections(), 1);
}

async fn an_upstream_closing_connections_costs_no_request(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let closing = common::Upstream::start(|_| async {
        let mut response = common::response(200, "bye");
        response
            .headers_mut()
            .insert("connection", "close".parse().unwrap());
        response
    })
    .await;
    gw.register("svc", &closing.url()).await;
    for _ in 0..20 {
        let reply = gw.request(Method::POST, "/call/svc/x", "data", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "bye");
    }
    assert_eq!(closing.connections(), 20);
}

async fn concurrent_calls_each_get_their_own_answer(way: Way) {
    // Many calls in flight at once: their requests and responses go out
    // together at the end of the gateway's turns (src/turn.rs), and none
    // may get another's answer.
    let gw = TestGateway::start_way(QUIET, way).await;
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    gw.register("echo", &a.url()).await;
    gw.register("echo", &b.url()).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..64usize {
        let (caller, url) = (gw.caller.clone(), gw.url(&format!("/call/echo/call/{i}")));
        calls.spawn(async move {
            let request = Request::post(url)
                .body(Full::new(Bytes::from(vec![b'x'; i * 100])))
                .unwrap();
            (i, caller.send(request).await)
        });
    }
    while let Some(done) = calls.join_next().await {
        let (i, reply) = done.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let echo = reply.json();
        assert_eq!(echo["uri"], format!("/call/{i}"));
        assert_eq!(echo["body_len"], i * 100);
        let answered_by = if echo["name"] == "a" { &a } else { &b };
        assert_eq!(
            reply.header("x-switchyard-upstream"),
            Some(answered_by.upstream.addr.to_string().as_str())
        );
    }
    assert_eq!(a.hits() + b.hits(), 64);
}

each_way! {
    forwards_method_path_query_body_and_headers_faithfully,
    response_hop_by_hop_headers_are_removed,
    the_instance_base_path_prefixes_the_rest,
    bad_targets_are_refused_and_reach_no_upstream,
    every_client_is_forwarded_as_http1_1,
    a_dead_instance_among_three_costs_no_request,
    an_instance_answering_503_is_retried_around_for_idempotent_calls,
    an_instance_answering_500_trips_its_circuit_is_avoided_and_recovers,
    with_500_in_retry_on_status_idempotent_calls_never_see_it,
    a_hanging_instance_times_out_and_is_retried_around,
    everything_hanging_gives_504_within_the_request_timeout,
    all_dead_gives_502_upstream_unreachable,
    when_everything_fails_the_budget_caps_amplification,
    every_circuit_open_gives_503_circuit_open_with_retry_after,
    all_unhealthy_gives_503_no_healthy_instance,
    bodies_stream_both_ways_and_survive_a_connect_failure,
    large_responses_stream_through,
    per_service_overrides_apply_to_static_and_registered_instances,
    upstream_connections_are_kept_alive_and_reused,
    an_upstream_closing_connections_costs_no_request,
    concurrent_calls_each_get_their_own_answer,
}
