//! The registry's lifecycle through the API (SPEC §7): TTL heartbeats,
//! drain, `deregister_after`, and the reason every non-routable instance
//! gives. The store's durability across a `kill -9` is in `durability.rs`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Echo, TestGateway, Way, dead_url, each_way, eventually};
use http::{Method, StatusCode};
use serde_json::json;

const CHECKS_OFF: &str = "[health_check]\ninterval = \"0s\"\n";

// The new endpoints on a fresh HTTP/1.1 connection, on one that carried
// another request, and over HTTP/2.
each_way! {
    a_heartbeat_renews_and_an_unknown_instance_gets_404,
    the_state_endpoint_takes_draining_or_active_only,
}

async fn register_ttl(gw: &TestGateway, name: &str, url: &str, ttl: &str) -> serde_json::Value {
    let reply = gw
        .post_json("/services", &json!({"name": name, "url": url, "ttl": ttl}))
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()
}

async fn instance(gw: &TestGateway, service: &str) -> serde_json::Value {
    let reply = gw.get(&format!("/services/{service}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["instances"][0].clone()
}

#[tokio::test]
async fn ttl_outside_one_second_to_one_hour_is_refused_naming_the_field() {
    let gw = TestGateway::start(CHECKS_OFF).await;
    for ttl in [
        json!("500ms"),
        json!("2h"),
        json!("soon"),
        json!(15),
        json!(""),
    ] {
        let reply = gw
            .post_json(
                "/services",
                &json!({"name": "svc", "url": "http://10.0.0.1:80", "ttl": ttl}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "ttl {ttl}");
        assert_eq!(reply.error_code(), "invalid_json", "ttl {ttl}");
        assert!(reply.text().contains("ttl"), "ttl {ttl}: {}", reply.text());
    }
    assert_eq!(
        gw.get("/services/svc").await.status,
        StatusCode::NOT_FOUND,
        "nothing was registered"
    );
    for (port, ttl) in [(81, "1s"), (82, "1h"), (83, "15s")] {
        register_ttl(&gw, "svc", &format!("http://10.0.0.1:{port}"), ttl).await;
    }
}

async fn a_heartbeat_renews_and_an_unknown_instance_gets_404(way: Way) {
    let gw = TestGateway::start_way(CHECKS_OFF, way).await;
    let registered = register_ttl(&gw, "svc", "http://10.0.0.1:80", "15s").await;
    let id = registered["id"].as_str().unwrap();

    let path = format!("/services/svc/instances/{id}/heartbeat");
    let reply = gw.request(Method::PUT, &path, "", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["id"], id);
    assert_eq!(body["url"], "http://10.0.0.1:80");

    let reply = gw
        .request(
            Method::PUT,
            "/services/svc/instances/nope/heartbeat",
            "",
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "instance_not_found");
    let reply = gw
        .request(
            Method::PUT,
            "/services/other/instances/x/heartbeat",
            "",
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    let reply = gw.get(&path).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("PUT"));
}

/// Real time, once: the unit tests drive the wheel with paused time.
#[tokio::test]
async fn an_instance_that_stops_heartbeating_is_removed_and_one_that_beats_stays() {
    let gw = TestGateway::start(CHECKS_OFF).await;
    register_ttl(&gw, "svc", "http://10.0.0.1:80", "1s").await;
    let beating = register_ttl(&gw, "svc", "http://10.0.0.2:80", "1s").await;
    let beat = format!(
        "/services/svc/instances/{}/heartbeat",
        beating["id"].as_str().unwrap()
    );
    let registered = tokio::time::Instant::now();
    // Heartbeats every 300 ms keep the second one while the first expires.
    loop {
        let reply = gw.request(Method::PUT, &beat, "", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let service = gw.get("/services/svc").await.json();
        let ids: Vec<_> = service["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        if ids == ["10.0.0.2:80"] {
            break;
        }
        assert!(
            registered.elapsed() < Duration::from_secs(4),
            "the silent instance is still listed: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Expiry took at least the TTL.
    assert!(registered.elapsed() >= Duration::from_secs(1));
}

async fn the_state_endpoint_takes_draining_or_active_only(way: Way) {
    let gw = TestGateway::start_way(CHECKS_OFF, way).await;
    let registered = gw.register("svc", "http://10.0.0.1:80").await;
    assert_eq!(registered["state"], "active");
    assert_eq!(registered["routable"], true);
    assert_eq!(registered["reason"], serde_json::Value::Null);
    let path = format!(
        "/services/svc/instances/{}/state",
        registered["id"].as_str().unwrap()
    );
    for body in [
        json!({"state": "paused"}),
        json!({"state": 1}),
        json!({}),
        json!("draining"),
    ] {
        let reply = gw.put_json(&path, &body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.error_code(), "invalid_json", "{body}");
        if body.is_object() {
            assert!(reply.text().contains("state"), "{body}: {}", reply.text());
        }
        assert_eq!(instance(&gw, "svc").await["state"], "active", "{body}");
    }
    let reply = gw
        .put_json(
            "/services/svc/instances/nope/state",
            &json!({"state": "draining"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "instance_not_found");

    let reply = gw.put_json(&path, &json!({"state": "draining"})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["state"], "draining");
    assert_eq!(body["routable"], false);
    assert_eq!(body["reason"], "draining");
    let service = gw.get("/services/svc").await.json();
    assert_eq!(service["routable_instances"], 0);

    let reply = gw.get("/call/svc/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);

    let reply = gw.put_json(&path, &json!({"state": "active"})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["routable"], true);
    assert_eq!(
        gw.get("/services/svc").await.json()["routable_instances"],
        1
    );
}

#[tokio::test]
async fn the_state_endpoint_is_an_admin_write() {
    let gw = TestGateway::start(
        "[health_check]\ninterval = \"0s\"\n[gateway]\nadmin_token = \"s3cret\"\n",
    )
    .await;
    let reply = gw
        .request(
            Method::POST,
            "/services",
            &json!({"name": "svc", "url": "http://10.0.0.1:80"}).to_string(),
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer s3cret"),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    for path in [
        "/services/svc/instances/10.0.0.1:80/state",
        "/services/svc/instances/10.0.0.1:80/heartbeat",
    ] {
        let reply = gw.put_json(path, &json!({"state": "draining"})).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(instance(&gw, "svc").await["state"], "active");
}

/// Under a steady load from 8 clients, no request sent after the drain's
/// 200 is answered by the drained instance; those already sent finish.
#[tokio::test]
async fn no_request_reaches_a_draining_instance_after_the_200() {
    let gw = Arc::new(TestGateway::start(CHECKS_OFF).await);
    let a = Echo::start("a").await;
    let b = Echo::start("b").await;
    let a_id = gw.register("svc", &a.url()).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    gw.register("svc", &b.url()).await;

    // Each client stamps a request with the drain generation it saw
    // before sending it: 1 means "sent after the drain's 200".
    let drained = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let after_drain = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (gw, drained, stop, after_drain) = (
            gw.clone(),
            drained.clone(),
            stop.clone(),
            after_drain.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut answered_by_a_after = 0;
            while !stop.load(Ordering::SeqCst) {
                let sent_after_drain = drained.load(Ordering::SeqCst);
                let reply = gw.get("/call/svc/work").await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                if sent_after_drain {
                    after_drain.fetch_add(1, Ordering::SeqCst);
                    if reply.json()["name"] == "a" {
                        answered_by_a_after += 1;
                    }
                }
            }
            answered_by_a_after
        }));
    }
    eventually(Duration::from_secs(10), "both instances serve", || async {
        a.hits() > 20 && b.hits() > 20
    })
    .await;
    let reply = gw
        .put_json(
            &format!("/services/svc/instances/{a_id}/state"),
            &json!({"state": "draining"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    drained.store(true, Ordering::SeqCst);
    let hits_at_drain = a.hits();
    eventually(Duration::from_secs(10), "load after the drain", || async {
        after_drain.load(Ordering::SeqCst) >= 400
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        assert_eq!(client.await.unwrap(), 0, "a drained instance answered");
    }
    // At most the 8 requests in flight at the drain reached it afterwards.
    assert!(
        a.hits() <= hits_at_drain + 8,
        "{} > {hits_at_drain} + 8",
        a.hits()
    );
    // Checks go on while draining: the instance is still listed.
    assert_eq!(
        gw.get(&format!("/services/svc/instances/{a_id}"))
            .await
            .json()["state"],
        "draining"
    );
}

#[tokio::test]
async fn an_unhealthy_instance_says_how_many_checks_failed_and_the_last_error() {
    let gw = TestGateway::start(
        "[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 2\ntimeout = \"1s\"\n",
    )
    .await;
    let dead = dead_url().await;
    gw.register("svc", &dead).await;
    let fresh = instance(&gw, "svc").await;
    assert_eq!(fresh["last_check"], serde_json::Value::Null);
    assert_eq!(fresh["reason"], serde_json::Value::Null);

    for _ in 0..3 {
        gw.get("/services/svc/health?refresh=true").await;
    }
    let shown = instance(&gw, "svc").await;
    assert_eq!(shown["routable"], false);
    assert_eq!(
        shown["reason"],
        "unhealthy: 3 consecutive failed checks, last: connection refused"
    );
    let check = &shown["last_check"];
    assert_eq!(check["ok"], false);
    assert_eq!(check["error"], "connection refused");
    assert!(check.get("status").is_none(), "{check}");
    assert!(check["at"].as_str().unwrap().ends_with('Z'), "{check}");
    assert!(check["duration_ms"].is_u64(), "{check}");
    let service = gw.get("/services/svc").await.json();
    assert_eq!(service["routable_instances"], 0);
}

#[tokio::test]
async fn a_failing_check_with_a_status_shows_it() {
    let gw =
        TestGateway::start("[health_check]\ninterval = \"0s\"\nunhealthy_threshold = 1\n").await;
    let up = Echo::start("up").await;
    up.set_status(503);
    gw.register("svc", &up.url()).await;
    gw.get("/services/svc/health?refresh=true").await;
    let shown = instance(&gw, "svc").await;
    assert_eq!(
        shown["reason"],
        "unhealthy: 1 consecutive failed check, last: status 503"
    );
    assert_eq!(shown["last_check"]["status"], 503);
    assert!(shown["last_check"].get("error").is_none());

    up.set_status(200);
    gw.get("/services/svc/health?refresh=true").await;
    let shown = instance(&gw, "svc").await;
    assert_eq!(shown["routable"], true);
    assert_eq!(shown["reason"], serde_json::Value::Null);
    assert_eq!(shown["last_check"]["ok"], true);
    assert_eq!(shown["last_check"]["status"], 200);
}

#[tokio::test]
async fn an_open_circuit_says_until_when_and_after_what() {
    let gw = TestGateway::start(
        "[health_check]\ninterval = \"0s\"\n[retry]\nmax_attempts = 1\n\
         [circuit_breaker]\nfailure_threshold = 3\nreset_timeout = \"30s\"\n",
    )
    .await;
    let up = Echo::start("up").await;
    up.set_status(500);
    gw.register("svc", &up.url()).await;
    for _ in 0..3 {
        assert_eq!(
            gw.get("/call/svc/").await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let shown = instance(&gw, "svc").await;
    assert_eq!(shown["circuit"], "open");
    assert_eq!(shown["routable"], false);
    let reason = shown["reason"].as_str().unwrap();
    let until = reason
        .strip_prefix("circuit open until ")
        .and_then(|rest| rest.strip_suffix(" after 3 consecutive failures (last: 500)"))
        .unwrap_or_else(|| panic!("{reason}"));
    let until = humantime::parse_rfc3339(until).unwrap_or_else(|e| panic!("{until}: {e}"));
    let left = until
        .duration_since(std::time::SystemTime::now())
        .expect("the deadline is ahead");
    // Shown to the second, rounded up.
    assert!(
        left <= Duration::from_secs(31) && left > Duration::from_secs(20),
        "{left:?}"
    );
}

#[tokio::test]
async fn an_instance_unhealthy_for_deregister_after_is_removed_per_service() {
    let dead = dead_url().await;
    let other = dead_url().await;
    let gw = TestGateway::start(&format!(
        "[health_check]\ninterval = \"100ms\"\nunhealthy_threshold = 1\ntimeout = \"1s\"\n\
         [[services]]\nname = \"short\"\nurls = [\"{dead}\"]\n\
         [services.health_check]\nderegister_after = \"300ms\"\n\
         [[services]]\nname = \"kept\"\nurls = [\"{other}\"]\n"
    ))
    .await;
    eventually(
        Duration::from_secs(10),
        "the unhealthy instance removed",
        || async {
            gw.get("/services/short").await.status == StatusCode::NOT_FOUND
                || gw.get("/services/short").await.json()["instances"]
                    .as_array()
                    .is_some_and(|i| i.is_empty())
        },
    )
    .await;
    // The gateway-wide default (0s) never removes.
    let kept = instance(&gw, "kept").await;
    assert_eq!(kept["status"], "unhealthy");
}
