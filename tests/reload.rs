//! Reloading the configuration (SPEC §9 "Reload"): in process through
//! `Gateway::reload`, and end to end with the real binary and SIGHUP.
//! A valid configuration applies to what starts afterwards, whole; an
//! invalid one changes nothing; what needs a restart is reported, not
//! applied; and no request in flight is dropped.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::process::{self, Running, TempDir};
use common::{Echo, Reply, TestGateway, Upstream, eventually, response};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

/// Health checks off: most of these tests are about other settings.
const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

async fn instances(gw: &TestGateway, service: &str) -> Vec<serde_json::Value> {
    let reply = gw.get(&format!("/services/{service}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["instances"].as_array().unwrap().clone()
}

async fn register_with(gw: &TestGateway, token: &str, url: &str) -> StatusCode {
    let body = json!({"name": "svc", "url": url}).to_string();
    let auth = format!("Bearer {token}");
    gw.request(
        Method::POST,
        "/services",
        &body,
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
    )
    .await
    .status
}

#[tokio::test]
async fn a_new_failure_threshold_reaches_an_existing_circuit_which_keeps_its_count() {
    let config = |threshold: u32| {
        format!(
            "{QUIET}[retry]\nmax_attempts = 1\n[circuit_breaker]\nfailure_threshold = {threshold}\n"
        )
    };
    let gw = TestGateway::start(&config(5)).await;
    let up = Echo::start("failing").await;
    up.set_status(500);
    gw.register("svc", &up.url()).await;
    for _ in 0..2 {
        assert_eq!(gw.get("/call/svc/").await.status, 500);
    }

    let report = gw.reload(&config(3)).await;
    assert_eq!(report.result, Ok(()));
    assert_eq!(report.applied, ["circuit_breaker.failure_threshold"]);
    let instance = &instances(&gw, "svc").await[0];
    assert_eq!(instance["circuit"], "closed");
    assert_eq!(instance["consecutive_failures"], 2, "the count stays");

    assert_eq!(gw.get("/call/svc/").await.status, 500);
    let instance = &instances(&gw, "svc").await[0];
    assert_eq!(
        instance["circuit"], "open",
        "the third failure meets the new threshold: {instance}"
    );
    let reply = gw.get("/call/svc/").await;
    assert_eq!(reply.error_code(), "circuit_open");
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn a_service_override_of_max_attempts_applies_from_the_next_request() {
    let first = Echo::start("first").await;
    let second = Echo::start("second").await;
    for up in [&first, &second] {
        up.set_status(503);
    }
    let config = |attempts: u32| {
        format!(
            "{QUIET}[circuit_breaker]\nfailure_threshold = 100\n\
             [retry]\nmax_attempts = 3\nbackoff_base = \"0s\"\nbackoff_max = \"0s\"\n\
             [[services]]\nname = \"svc\"\nurls = [\"{}\", \"{}\"]\n\
             [services.retry]\nmax_attempts = {attempts}\n",
            first.url(),
            second.url()
        )
    };
    let gw = TestGateway::start(&config(1)).await;
    let hits = || first.hits() + second.hits();
    assert_eq!(gw.get("/call/svc/").await.status, 503);
    assert_eq!(hits(), 1, "the override: one attempt");

    let report = gw.reload(&config(2)).await;
    assert_eq!(report.applied, ["services[svc].retry.max_attempts"]);
    assert_eq!(gw.get("/call/svc/").await.status, 503);
    assert_eq!(hits(), 3, "two attempts now");
}

#[tokio::test]
async fn a_raised_instance_limit_takes_the_registration_it_refused() {
    let config = |per_service: u32| {
        format!("{QUIET}[limits]\nmax_instances = 10\nmax_instances_per_service = {per_service}\n")
    };
    let gw = TestGateway::start(&config(1)).await;
    gw.register("svc", "http://127.0.0.1:9001").await;
    let body = json!({"name": "svc", "url": "http://127.0.0.1:9002"});
    let refused = gw.post_json("/services", &body).await;
    assert_eq!(refused.error_code(), "limit_exceeded");

    assert!(gw.reload(&config(2)).await.is_ok());
    assert_eq!(
        gw.post_json("/services", &body).await.status,
        StatusCode::CREATED
    );
    assert_eq!(instances(&gw, "svc").await.len(), 2);
}

#[tokio::test]
async fn a_raised_connection_limit_serves_the_connection_that_waited() {
    let config = |max: u32| format!("{QUIET}[limits]\nmax_connections = {max}\n");
    let gw = TestGateway::start(&config(1)).await;
    let ask = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut first = gw.raw().await;
    first.write_all(ask).await.unwrap();
    let mut buf = [0u8; 512];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let mut second = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    second.write_all(ask).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond max_connections");

    assert!(gw.reload(&config(2)).await.is_ok());
    let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
        .await
        .expect("served once the limit grew")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(first);
}

#[tokio::test]
async fn static_services_are_added_removed_and_moved_and_registrations_stay() {
    let (a, b, moved, dynamic) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("moved").await,
        Echo::start("dynamic").await,
    );
    let service =
        |name: &str, url: String| format!("[[services]]\nname = \"{name}\"\nurls = [\"{url}\"]\n");
    let gw = TestGateway::start(&format!("{QUIET}{}", service("a", a.url()))).await;
    gw.register("a", &dynamic.url()).await;

    let report = gw
        .reload(&format!(
            "{QUIET}{}{}",
            service("a", a.url()),
            service("b", b.url())
        ))
        .await;
    assert_eq!(report.applied, ["services[b]"]);
    let reply = gw.get("/call/b/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["name"], "b");

    // `a` goes: its static instance with it, the registration stays.
    let report = gw
        .reload(&format!("{QUIET}{}", service("b", b.url())))
        .await;
    assert_eq!(report.applied, ["services[a]"]);
    let left = instances(&gw, "a").await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["url"], dynamic.url());
    assert_eq!(gw.get("/call/a/").await.json()["name"], "dynamic");

    // `b` under the same id at another base path: the instance is replaced.
    let report = gw
        .reload(&format!(
            "{QUIET}{}",
            service("b", format!("{}/v2", b.url()))
        ))
        .await;
    assert_eq!(report.applied, ["services[b].urls"]);
    let now = instances(&gw, "b").await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0]["url"], format!("{}/v2", b.url()));
    assert_eq!(gw.get("/call/b/x").await.json()["uri"], "/v2/x");

    // And to another instance altogether.
    gw.reload(&format!("{QUIET}{}", service("b", moved.url())))
        .await;
    let now = instances(&gw, "b").await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(gw.get("/call/b/").await.json()["name"], "moved");
}

#[tokio::test]
async fn a_tightened_upstream_policy_closes_the_way_to_pooled_connections_too() {
    // Refused connects are failures: a high threshold keeps the circuit
    // out of it.
    let base = format!("{QUIET}[circuit_breaker]\nfailure_threshold = 100\n");
    let gw = TestGateway::start(&base).await;
    let up = Echo::start("local").await;
    gw.register("svc", &up.url()).await;
    assert_eq!(gw.get("/call/svc/").await.status, StatusCode::OK);
    assert_eq!(
        up.upstream.connections(),
        1,
        "one connection, kept in the pool"
    );

    let report = gw
        .reload(&format!("{base}[upstreams]\ndeny = [\"127.0.0.0/8\"]\n"))
        .await;
    assert_eq!(report.applied, ["upstreams.deny"]);
    let reply = gw.get("/call/svc/").await;
    assert_eq!(reply.error_code(), "upstream_forbidden");
    assert_eq!(up.hits(), 1, "the pooled connection was not used");
    let refused = gw
        .post_json(
            "/services",
            &json!({"name": "svc", "url": "http://127.0.0.1:9001"}),
        )
        .await;
    assert_eq!(refused.error_code(), "upstream_forbidden");

    assert!(gw.reload(&base).await.is_ok());
    assert_eq!(gw.get("/call/svc/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_new_admin_token_replaces_the_old_at_once() {
    let config = |token: &str| format!("{QUIET}[gateway]\nadmin_token = \"{token}\"\n");
    let gw = TestGateway::start(&config("old-token")).await;
    assert_eq!(
        register_with(&gw, "old-token", "http://127.0.0.1:9001").await,
        StatusCode::CREATED
    );

    let report = gw.reload(&config("new-token")).await;
    assert_eq!(report.applied, ["gateway.admin_token"]);
    assert_eq!(
        register_with(&gw, "old-token", "http://127.0.0.1:9002").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        register_with(&gw, "new-token", "http://127.0.0.1:9002").await,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn reloads_are_counted_in_the_metrics_and_shown_on_the_status_page() {
    let gw = TestGateway::start(QUIET).await;
    let status = gw.get("/status.json").await.json();
    assert!(status.get("reloads").is_none(), "no reload yet: {status}");

    assert!(
        gw.reload(&format!(
            "{QUIET}[limits]\nmax_instances_per_service = 10\n"
        ))
        .await
        .is_ok()
    );
    let status = gw.get("/status.json").await.json();
    assert_eq!(status["reloads"]["succeeded"], 1);
    assert!(status["reloads"].get("last_error").is_none(), "{status}");

    assert!(!gw.reload("[retry]\nmax_attempts = 0\n").await.is_ok());
    let status = gw.get("/status.json").await.json();
    assert_eq!(status["reloads"]["failed"], 1);
    let error = status["reloads"]["last_error"].as_str().unwrap();
    assert!(error.contains("retry.max_attempts"), "{error}");

    let metrics = gw.get("/metrics").await.text();
    for line in [
        "switchyard_config_reloads_total{result=\"success\"} 1\n",
        "switchyard_config_reloads_total{result=\"failure\"} 1\n",
        "switchyard_config_last_reload_successful 0\n",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn an_invalid_configuration_changes_nothing_of_what_it_holds() {
    let static_up = Echo::start("static").await;
    let base = format!(
        "{QUIET}[[services]]\nname = \"kept\"\nurls = [\"{}\"]\n",
        static_up.url()
    );
    let gw = TestGateway::start(&format!("[gateway]\nadmin_token = \"old-token\"\n{base}")).await;
    let changes =
        "[gateway]\nadmin_token = \"new-token\"\n[limits]\nmax_instances_per_service = 1\n";

    // A value out of range, beside valid changes.
    let report = gw
        .reload(&format!("{changes}{QUIET}[retry]\nmax_attempts = 0\n"))
        .await;
    let error = report.result.clone().unwrap_err();
    assert!(error.contains("retry.max_attempts"), "{error}");
    // A static service outside the upstream networks.
    let report = gw
        .reload(&format!(
            "{changes}{QUIET}[[services]]\nname = \"metadata\"\nurls = [\"http://169.254.169.254\"]\n"
        ))
        .await;
    let error = report.result.clone().unwrap_err();
    assert!(
        error.contains("metadata") && error.contains("upstream"),
        "{error}"
    );

    for url in ["http://127.0.0.1:9001", "http://127.0.0.1:9002"] {
        assert_eq!(
            register_with(&gw, "old-token", url).await,
            StatusCode::CREATED,
            "the old token and the old limit hold"
        );
    }
    assert_eq!(gw.get("/call/kept/").await.json()["name"], "static");
    assert_eq!(
        gw.get("/services/metadata").await.status,
        StatusCode::NOT_FOUND
    );
    let reloads = gw.gateway.reloads();
    assert_eq!((reloads.succeeded, reloads.failed), (0, 2));
    assert_eq!(reloads.last.unwrap().result, Err(error));
}

#[tokio::test]
async fn settings_that_need_a_restart_are_reported_and_keep_their_values() {
    let gw = TestGateway::start(QUIET).await;
    let report = gw
        .reload(&format!(
            "{QUIET}[gateway]\nworkers = 3\n[registry]\nstore = \"file\"\n[limits]\nmax_instances = 7000\n"
        ))
        .await;
    assert_eq!(report.result, Ok(()));
    assert_eq!(report.not_applied, ["gateway.workers", "registry.store"]);
    assert_eq!(report.applied, ["limits.max_instances"]);
    let config = gw.gateway.config();
    assert_eq!(config.gateway.workers, 0);
    assert_eq!(config.registry.store.as_str(), "memory");
    assert_eq!(config.limits.max_instances, 7000);
    assert_eq!(gw.gateway.registry().store_description(), "memory");
    let reloads = gw.gateway.reloads();
    assert_eq!((reloads.succeeded, reloads.failed), (1, 0));
    assert_eq!(reloads.last.unwrap().not_applied, report.not_applied);
}

#[tokio::test]
async fn health_checks_take_a_new_interval_and_path_from_their_next_check() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let up = Upstream::start(move |request: Request<hyper::body::Incoming>| {
        let _ = seen_tx.send(request.uri().path().to_string());
        async { response(200, "") }
    })
    .await;
    let config = |interval: &str, path: &str| {
        format!("[health_check]\ninterval = \"{interval}\"\npath = \"{path}\"\n")
    };
    let gw = TestGateway::start(&config("1h", "/health")).await;
    gw.register("svc", &up.url()).await;
    assert_eq!(
        seen.recv().await.as_deref(),
        Some("/health"),
        "checked at once"
    );

    // The next check was an hour away: the reload cuts the wait.
    assert!(gw.reload(&config("100ms", "/ready")).await.is_ok());
    for _ in 0..3 {
        let path = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .expect("checked at the new interval");
        assert_eq!(path.as_deref(), Some("/ready"));
    }

    // Off: the checks stop until a reload turns them on again.
    assert!(gw.reload(&config("0s", "/ready")).await.is_ok());
    let mut after_off = 0;
    while tokio::time::timeout(Duration::from_millis(500), seen.recv())
        .await
        .is_ok()
    {
        after_off += 1;
        assert!(after_off <= 1, "checks went on with interval = \"0s\"");
    }
    assert!(gw.reload(&config("100ms", "/again")).await.is_ok());
    let path = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("checked again");
    assert_eq!(path.as_deref(), Some("/again"));
}

#[tokio::test]
async fn a_reload_that_turns_checks_on_starts_them_for_registered_instances() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let up = Upstream::start(move |request: Request<hyper::body::Incoming>| {
        let _ = seen_tx.send(request.uri().path().to_string());
        async { response(200, "") }
    })
    .await;
    let gw = TestGateway::start(QUIET).await;
    gw.register("svc", &up.url()).await;
    assert_eq!(instances(&gw, "svc").await[0]["status"], "unknown");

    let report = gw
        .reload("[health_check]\ninterval = \"1h\"\npath = \"/up\"\n")
        .await;
    assert_eq!(
        report.applied,
        ["health_check.interval", "health_check.path"]
    );
    let path = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("checked once the reload turned checks on");
    assert_eq!(path.as_deref(), Some("/up"));
    eventually(Duration::from_secs(10), "the check is recorded", || async {
        instances(&gw, "svc").await[0]["status"] == "healthy"
    })
    .await;
}

/// An upstream whose requests each report their arrival, then wait for a
/// permit before answering 200.
async fn gated() -> (Upstream, mpsc::UnboundedReceiver<()>, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let permits = gate.clone();
    let upstream = Upstream::start(move |_| {
        let (permits, entered_tx) = (permits.clone(), entered_tx.clone());
        async move {
            let _ = entered_tx.send(());
            let _ = permits.acquire().await.map(|p| p.forget());
            response(200, "done")
        }
    })
    .await;
    (upstream, entered, gate)
}

#[tokio::test]
async fn requests_in_flight_finish_under_the_settings_they_started_with() {
    const IN_FLIGHT: usize = 8;
    let (slow, mut entered, gate) = gated().await;
    let config = |timeout: &str| {
        format!(
            "{QUIET}[proxy]\nrequest_timeout = \"{timeout}\"\n[retry]\nmax_attempts = 1\n\
             [[services]]\nname = \"slow\"\nurls = [\"{}\"]\n",
            slow.url()
        )
    };
    let gw = Arc::new(TestGateway::start(&config("30s")).await);
    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.get("/call/slow/").await })
        })
        .collect();
    for _ in 0..IN_FLIGHT {
        entered.recv().await.unwrap();
    }

    assert!(gw.reload(&config("100ms")).await.is_ok());
    // A request that starts now gives up after the new timeout ...
    let late = gw.get("/call/slow/").await;
    assert_eq!(late.error_code(), "upstream_timeout");
    // ... while those in flight, older than that by now, kept theirs.
    gate.add_permits(IN_FLIGHT + 1);
    for request in requests {
        let reply: Reply = request.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.body, Bytes::from_static(b"done"));
    }
}

// ----- the real binary and SIGHUP -----

/// Writes the gateway's `gateway.toml`: a free port, two workers, checks
/// off, then `gateway` in `[gateway]`, then `rest`.
fn write_config(dir: &TempDir, gateway: &str, rest: &str) {
    let text =
        format!("[gateway]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n{gateway}\n{QUIET}{rest}");
    std::fs::write(dir.path("gateway.toml"), text).unwrap();
}

/// A registry write to the process with `token`; its status.
async fn register_at(gw: &Running, token: &str, url: &str) -> StatusCode {
    let request = Request::post(gw.url("/services"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(
            json!({"name": "dynamic", "url": url}).to_string(),
        )))
        .unwrap();
    common::send(&common::client(), request).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_file_refuses_an_invalid_one_and_reports_the_listen_address() {
    let dir = TempDir::new("reload-sighup");
    let up = Echo::start("added").await;
    write_config(&dir, "admin_token = \"old-token\"", "");
    let mut gw = Running::start(&dir);
    assert_eq!(
        gw.send(Method::GET, "/call/added/", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // A static service and a new token.
    write_config(
        &dir,
        "admin_token = \"new-token\"",
        &format!(
            "[[services]]\nname = \"added\"\nurls = [\"{}\"]\n",
            up.url()
        ),
    );
    gw.hangup();
    let line = gw.wait_for("configuration reloaded");
    assert!(
        line.contains("gateway.admin_token") && line.contains("services[added]"),
        "{line}"
    );
    let (status, echo) = gw.send(Method::GET, "/call/added/", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo["name"], "added");
    assert_eq!(
        register_at(&gw, "old-token", "http://127.0.0.1:9001").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        register_at(&gw, "new-token", "http://127.0.0.1:9001").await,
        StatusCode::CREATED
    );

    // An invalid file: logged, and nothing of it applied.
    std::fs::write(
        dir.path("gateway.toml"),
        "[gateway]\nadmin_token = \"third-token\"\n[retry\n",
    )
    .unwrap();
    gw.hangup();
    let line = gw.wait_for("configuration not reloaded");
    assert!(
        line.contains("gateway.toml") && line.contains("line"),
        "{line}"
    );
    assert_eq!(
        register_at(&gw, "new-token", "http://127.0.0.1:9002").await,
        StatusCode::CREATED,
        "the running token stays"
    );
    assert_eq!(
        gw.send(Method::GET, "/call/added/", None).await.0,
        StatusCode::OK
    );

    // Another listen address: everything else applies, it does not.
    std::fs::write(
        dir.path("gateway.toml"),
        format!(
            "[gateway]\nlisten = \"127.0.0.1:1\"\nworkers = 2\nadmin_token = \"new-token\"\n{QUIET}"
        ),
    )
    .unwrap();
    gw.hangup();
    let line = gw.wait_for("not applied: needs a restart");
    assert!(line.contains("gateway.listen"), "{line}");
    let line = gw.wait_for("configuration reloaded");
    assert!(line.contains("services[added]"), "{line}");
    assert_eq!(
        gw.send(Method::GET, "/call/added/", None).await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "the static service is gone, the gateway still listens where it did"
    );
    assert!(gw.child.try_wait().unwrap().is_none(), "still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_across_a_sighup_all_complete() {
    const IN_FLIGHT: usize = 16;
    let dir = TempDir::new("reload-in-flight");
    let (slow, mut entered, gate) = gated().await;
    let service = format!(
        "[[services]]\nname = \"slow\"\nurls = [\"{}\"]\n",
        slow.url()
    );
    write_config(&dir, "", &service);
    let mut gw = Running::start(&dir);
    let client = common::client();
    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/call/slow/"));
            tokio::spawn(
                async move { common::process::call(&client, Method::GET, url, None).await },
            )
        })
        .collect();
    for _ in 0..IN_FLIGHT {
        entered.recv().await.unwrap();
    }

    write_config(
        &dir,
        "admin_token = \"now-set\"",
        &format!("{service}[proxy]\nrequest_timeout = \"5s\"\n[retry]\nmax_attempts = 1\n"),
    );
    gw.hangup();
    gw.wait_for("configuration reloaded");
    gate.add_permits(IN_FLIGHT);
    for request in requests {
        let (status, _) = request.await.unwrap().expect("answered");
        assert_eq!(status, StatusCode::OK);
    }
    gate.add_permits(1);
    let (status, _) = common::process::call(&client, Method::GET, gw.url("/call/slow/"), None)
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::OK, "and the gateway serves on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_turns_the_access_log_on_in_json() {
    let dir = TempDir::new("reload-log");
    let up = Echo::start("logged").await;
    let service = format!(
        "[[services]]\nname = \"logged\"\nurls = [\"{}\"]\n",
        up.url()
    );
    write_config(&dir, "", &service);
    let mut gw = Running::start(&dir);
    assert_eq!(
        gw.send(Method::GET, "/call/logged/before", None).await.0,
        StatusCode::OK
    );

    write_config(
        &dir,
        "",
        &format!("[log]\naccess = true\nformat = \"json\"\n{service}"),
    );
    gw.hangup();
    let line = gw.wait_for("configuration reloaded");
    assert!(
        line.contains("log.access") && line.contains("log.format"),
        "{line}"
    );
    assert_eq!(
        gw.send(Method::GET, "/call/logged/after", None).await.0,
        StatusCode::OK
    );
    let line = gw.wait_for("switchyard::access");
    let access: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(access["path"], "/after", "{line}");
    assert_eq!(access["service"], "logged", "{line}");
    assert!(
        gw.seen.iter().all(|l| !l.contains("/before")),
        "no access line before the reload: {:#?}",
        gw.seen
    );
}

/// The soft and hard open-files limits of process `pid`.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("/proc/PID/limits has the open-files line");
    let mut figures = line["Max open files".len()..].split_whitespace();
    let soft = figures.next().unwrap().to_string();
    (soft, figures.next().unwrap().to_string())
}

/// The open-files limit (src/server/open_files.rs) is raised to the hard
/// limit at start, and one short of what `max_connections` needs is
/// warned of, at start and after each reload.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit_and_a_short_one_warned_of() {
    let dir = TempDir::new("nofile");
    // 1000 connections need some 2 256 open files: enough.
    dir.config("[limits]\nmax_connections = 1000\n");
    // As a shell with `ulimit -Sn 256` under a hard limit of 4096 starts it.
    let wrapper = ["prlimit", "--nofile=256:4096", "--"];
    let mut running = Running::spawn(process::under(&wrapper, &dir.0));
    let raised = running
        .seen
        .iter()
        .find(|line| line.contains("open files limit raised"));
    let raised = raised.unwrap_or_else(|| panic!("not raised: {:#?}", running.seen));
    assert!(raised.contains("from=Some(256) to=Some(4096)"), "{raised}");
    assert!(
        !running.seen.iter().any(|line| line.contains("is short")),
        "{:#?}",
        running.seen
    );
    assert_eq!(
        open_files_limits(running.child.id()),
        ("4096".to_string(), "4096".to_string())
    );
    // A reload to 5000 needs some 10 256: more than the hard limit.
    dir.config("[limits]\nmax_connections = 5000\n");
    running.hangup();
    let short = running.wait_for("open files limit is short");
    assert!(
        short.contains("limit=4096") && short.contains("needed=10256"),
        "{short}"
    );
    assert_eq!(running.terminate().0.code(), Some(0));
}
