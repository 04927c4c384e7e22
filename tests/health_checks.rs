//! Active health checks end to end (SPEC §5): real upstreams whose /health
//! answer the tests switch, and the gateway's view of them through the API.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestGateway, Upstream, eventually, response};
use http::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// An upstream whose `/health` status the test sets, counting its checks.
struct Checked {
    upstream: Upstream,
    status: Arc<AtomicU16>,
    checks: Arc<AtomicUsize>,
    paths: mpsc::UnboundedReceiver<String>,
}

async fn checked(status: u16) -> Checked {
    let code = Arc::new(AtomicU16::new(status));
    let checks = Arc::new(AtomicUsize::new(0));
    let (tx, paths) = mpsc::unbounded_channel();
    let (c, n) = (code.clone(), checks.clone());
    let upstream = Upstream::start(move |request| {
        let (c, n, tx) = (c.clone(), n.clone(), tx.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(request.uri().path().to_string());
            response(c.load(Ordering::SeqCst), "health")
        }
    })
    .await;
    Checked {
        upstream,
        status: code,
        checks,
        paths,
    }
}

async fn instance_status(gw: &TestGateway, service: &str) -> String {
    let service = gw.get(&format!("/services/{service}")).await.json();
    service["instances"][0]["status"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn an_instance_goes_unhealthy_and_comes_back() {
    // Periodic checks off: each `refresh=true` is exactly one check.
    let gw = TestGateway::start(
        "[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 2\nhealthy_threshold = 2\n",
    )
    .await;
    let up = checked(200).await;
    gw.register("svc", &up.upstream.url()).await;

    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(reply.status, StatusCode::OK);
    let json = reply.json();
    // One pass of two needed: still unknown, but routable.
    assert_eq!(json["instances"][0]["status"], "unknown");
    assert!(json["instances"][0]["last_ping"].is_string());
    let reply = gw.get("/services/svc/health?refresh=true").await.json();
    assert_eq!(reply["status"], "healthy");
    assert_eq!(reply["instances"][0]["status"], "healthy");
    let first_ping = reply["instances"][0]["last_ping"].clone();

    up.status.store(500, Ordering::SeqCst);
    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "one failure of two: still healthy"
    );
    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let json = reply.json();
    assert_eq!(json["status"], "unhealthy");
    assert_eq!(json["instances"][0]["status"], "unhealthy");
    assert_eq!(
        json["instances"][0]["last_ping"], first_ping,
        "last_ping is the last pass"
    );
    // Without refresh the endpoint reports the same, without checking.
    let before = up.checks.load(Ordering::SeqCst);
    assert_eq!(
        gw.get("/services/svc/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(up.checks.load(Ordering::SeqCst), before);

    up.status.store(204, Ordering::SeqCst);
    gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(instance_status(&gw, "svc").await, "unhealthy");
    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["instances"][0]["status"], "healthy");
}

#[tokio::test]
async fn a_service_is_healthy_while_any_instance_is() {
    let gw =
        TestGateway::start("[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 1\n").await;
    let good = checked(200).await;
    let bad = checked(503).await;
    gw.register("svc", &good.upstream.url()).await;
    gw.register("svc", &bad.upstream.url()).await;
    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(reply.status, StatusCode::OK);
    let json = reply.json();
    assert_eq!(json["status"], "healthy");
    assert_eq!(json["instances"][0]["status"], "healthy");
    assert_eq!(json["instances"][1]["status"], "unhealthy");
    good.status.store(500, Ordering::SeqCst);
    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["status"], "unhealthy");
}

#[tokio::test]
async fn first_check_runs_at_registration_on_the_configured_path_under_the_base_path() {
    // An hour between checks: the one seen must be the registration's own.
    let gw = TestGateway::start("[health_check]\ninterval = \"1h\"\npath = \"/ready\"\n").await;
    let mut up = checked(200).await;
    gw.register("svc", &format!("{}/api/v1/", up.upstream.url()))
        .await;
    let path = tokio::time::timeout(Duration::from_secs(10), up.paths.recv())
        .await
        .expect("a check arrives without waiting for the interval")
        .unwrap();
    assert_eq!(path, "/api/v1/ready");
    eventually(Duration::from_secs(10), "instance healthy", || async {
        instance_status(&gw, "svc").await == "healthy"
    })
    .await;
}

#[tokio::test]
async fn periodic_checks_flip_status_both_ways() {
    let gw = TestGateway::start(
        "[health_check]\ninterval = \"100ms\"\ntimeout = \"1s\"\nunhealthy_threshold = 2\n",
    )
    .await;
    let up = checked(200).await;
    gw.register("svc", &up.upstream.url()).await;
    eventually(Duration::from_secs(10), "healthy", || async {
        instance_status(&gw, "svc").await == "healthy"
    })
    .await;
    up.status.store(500, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "unhealthy", || async {
        gw.get("/services/svc/health").await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    up.status.store(200, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "healthy again", || async {
        gw.get("/services/svc/health").await.status == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn a_hanging_health_endpoint_fails_by_timeout() {
    let gw = TestGateway::start(
        "[health_check]\ninterval = \"0s\"\ntimeout = \"200ms\"\nunhealthy_threshold = 1\n",
    )
    .await;
    let hang = Upstream::start(|_| async {
        std::future::pending::<()>().await;
        response(200, "")
    })
    .await;
    gw.register("svc", &hang.url()).await;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        gw.get("/services/svc/health?refresh=true"),
    )
    .await
    .expect("the check is bounded by its timeout");
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["instances"][0]["status"], "unhealthy");
}

#[tokio::test]
async fn an_unreachable_instance_fails_its_checks() {
    let gw =
        TestGateway::start("[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 1\n").await;
    let up = checked(200).await;
    let url = up.upstream.url();
    drop(up);
    gw.register("svc", &url).await;
    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn removing_an_instance_stops_its_checker() {
    let gw = TestGateway::start("[health_check]\ninterval = \"100ms\"\n").await;
    let removed = checked(200).await;
    let kept = checked(200).await;
    gw.register("a", &removed.upstream.url()).await;
    eventually(Duration::from_secs(10), "first check of a", || async {
        removed.checks.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert_eq!(
        gw.delete("/services/a").await.status,
        StatusCode::NO_CONTENT
    );
    let after_removal = removed.checks.load(Ordering::SeqCst);
    // Same interval: by the time `kept` has been checked four times, `a`
    // would have been checked at least twice more had its checker lived on.
    gw.register("b", &kept.upstream.url()).await;
    eventually(Duration::from_secs(10), "four checks of b", || async {
        kept.checks.load(Ordering::SeqCst) >= 4
    })
    .await;
    assert_eq!(removed.checks.load(Ordering::SeqCst), after_removal);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_stops_checkers() {
    let gw = TestGateway::start("[health_check]\ninterval = \"0s\"\ntimeout = \"10s\"\n").await;
    let mut slow = common::Gated::start("").await;
    gw.register("svc", &slow.upstream.url()).await;

    // A request in flight: the refresh waits on the slow health endpoint.
    let client = gw.client.clone();
    let url = gw.url("/services/svc/health?refresh=true");
    let in_flight = tokio::spawn(async move {
        common::send(
            &client,
            http::Request::get(url).body(Default::default()).unwrap(),
        )
        .await
    });
    slow.entered.recv().await.unwrap();
    // An idle connection, closed as soon as the shutdown begins.
    let mut idle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();

    let mut gw = gw;
    gw.signal_shutdown();
    let server = gw.take_task();
    // Once the shutdown has begun, the server waits for the in-flight request...
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut byte))
        .await
        .expect("the idle connection is closed");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(!server.is_finished());
    // ... which completes normally once the upstream answers.
    slow.release.notify_one();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops once in-flight requests are done")
        .unwrap();
    // New connections are refused.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

#[tokio::test]
async fn consecutive_checks_of_an_instance_go_over_one_connection() {
    let gw = TestGateway::start("[health_check]\ninterval = \"0s\"\n").await;
    let up = checked(200).await;
    gw.register("svc", &up.upstream.url()).await;
    for _ in 0..3 {
        let reply = gw.get("/services/svc/health?refresh=true").await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(up.checks.load(Ordering::SeqCst), 3);
    assert_eq!(up.upstream.connections(), 1, "one connection, kept");
    let service = gw.gateway.registry().get("svc").unwrap();
    assert_eq!(
        service.instances()[0].pool().idle_count(),
        0,
        "kept by the checker, not in the pool proxied calls use"
    );
    assert_eq!(gw.gateway.registry().checker().kept_connections(), 1);
}

#[tokio::test]
async fn periodic_checks_go_over_one_connection() {
    let gw = TestGateway::start("[health_check]\ninterval = \"100ms\"\n").await;
    let up = checked(200).await;
    gw.register("svc", &up.upstream.url()).await;
    eventually(Duration::from_secs(10), "four checks", || async {
        up.checks.load(Ordering::SeqCst) >= 4
    })
    .await;
    assert_eq!(up.upstream.connections(), 1);
}

#[tokio::test]
async fn instances_at_one_address_share_the_kept_connections() {
    let gw = TestGateway::start("[health_check]\ninterval = \"0s\"\n").await;
    let up = checked(200).await;
    for id in ["a", "b", "c"] {
        let json = serde_json::json!({"name": "svc", "url": up.upstream.url(), "id": id});
        assert_eq!(
            gw.post_json("/services", &json).await.status,
            StatusCode::CREATED
        );
    }
    gw.get("/services/svc/health?refresh=true").await;
    let first_round = up.upstream.connections();
    assert!((1..=3).contains(&first_round), "{first_round}");
    for _ in 0..3 {
        gw.get("/services/svc/health?refresh=true").await;
    }
    assert_eq!(up.checks.load(Ordering::SeqCst), 12);
    assert_eq!(
        up.upstream.connections(),
        first_round,
        "later rounds open none"
    );
}

/// What a raw upstream does with a kept connection after its first answer.
#[derive(Clone, Copy)]
enum AfterFirst {
    /// Closes it at once: the gateway sees the close while it is idle.
    Close,
    /// Closes it when the next request arrives, unanswered: the close
    /// could not be seen before the request went out.
    CloseOnNext,
}

/// A raw HTTP/1.1 upstream answering `200 ok` (keep-alive) to the first
/// request of each connection, then closing it as `after` says. Counts
/// connections accepted, answers, and connections the gateway closed.
struct Closing {
    url: String,
    accepted: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    closed_by_peer: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn closing(after: AfterFirst) -> Closing {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let closed_by_peer = Arc::new(AtomicUsize::new(0));
    let (a, n, c) = (accepted.clone(), answered.clone(), closed_by_peer.clone());
    let task = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            let (n, c) = (n.clone(), c.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                let mut requests = 0;
                loop {
                    let read = stream.read(&mut buf).await.unwrap_or(0);
                    if read == 0 {
                        c.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    seen.extend_from_slice(&buf[..read]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        requests += 1;
                        if requests > 1 {
                            // CloseOnNext: the second request goes unanswered.
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        stream.write_all(answer).await.unwrap();
                        n.fetch_add(1, Ordering::SeqCst);
                        if matches!(after, AfterFirst::Close) {
                            return;
                        }
                    }
                }
            });
        }
    });
    Closing {
        url,
        accepted,
        answered,
        closed_by_peer,
        _task: AbortOnDrop(task),
    }
}

#[tokio::test]
async fn a_kept_connection_the_instance_closed_is_replaced_and_the_check_passes() {
    for after in [AfterFirst::Close, AfterFirst::CloseOnNext] {
        // One failure would make the instance unhealthy.
        let gw = TestGateway::start("[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 1\n")
            .await;
        let up = closing(after).await;
        gw.register("svc", &up.url).await;
        for round in 1..=3 {
            let reply = gw.get("/services/svc/health?refresh=true").await;
            assert_eq!(reply.status, StatusCode::OK, "check {round} passed");
            assert_eq!(reply.json()["instances"][0]["status"], "healthy");
        }
        assert_eq!(up.answered.load(Ordering::SeqCst), 3);
        assert_eq!(up.accepted.load(Ordering::SeqCst), 3, "one per check");
    }
}

#[tokio::test]
async fn a_kept_connection_is_closed_once_idle_for_the_pool_idle_timeout() {
    let gw = TestGateway::start(
        "[health_check]\ninterval = \"0s\"\n[proxy]\npool_idle_timeout = \"300ms\"\n",
    )
    .await;
    let up = closing(AfterFirst::CloseOnNext).await;
    gw.register("svc", &up.url).await;
    let reply = gw.get("/services/svc/health?refresh=true").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(gw.gateway.registry().checker().kept_connections(), 1);
    // No check comes again to notice it: the checker closes it by itself.
    eventually(
        Duration::from_secs(10),
        "the kept connection closed",
        || async { up.closed_by_peer.load(Ordering::SeqCst) == 1 },
    )
    .await;
    assert_eq!(gw.gateway.registry().checker().kept_connections(), 0);
}
