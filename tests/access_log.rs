//! The access log and the log format with the real binary (SPEC §9,
//! `[log]`): what a proxied call writes to stderr, in JSON and in text,
//! and what it does not write when the access log is off.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use common::process::{Running, TempDir};
use common::{Caller, Echo, Reply, Upstream, Way};
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

/// `[log]` with the access log on or off, in `format`, and the static
/// services `services`, each `(name, urls)`.
fn config(dir: &TempDir, access: bool, format: &str, services: &[(&str, Vec<String>)]) {
    let mut extra = format!("[log]\naccess = {access}\nformat = \"{format}\"\n");
    for (name, urls) in services {
        let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        extra += &format!(
            "[[services]]\nname = \"{name}\"\nurls = [{}]\n",
            urls.join(", ")
        );
    }
    dir.config(&extra);
}

async fn call(gw: &Running, method: &str, path: &str, body: &'static [u8]) -> Reply {
    let request = Request::builder()
        .method(method)
        .uri(gw.url(path))
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    common::send(&common::client(), request).await
}

fn request_id(reply: &Reply) -> String {
    reply
        .header("x-request-id")
        .expect("every answer carries its request id")
        .to_string()
}

/// The JSON access line of the request `id`.
fn access_line(gw: &mut Running, id: &str) -> Value {
    let line = gw.wait_for(id);
    let json: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(json["target"], "switchyard::access", "{line}");
    json
}

/// An instance id as the gateway makes it for a static URL.
fn instance_of(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_name_every_field_of_a_proxied_call() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("access-json");
    config(&dir, true, "json", &[("orders", vec![echo.url()])]);
    let mut gw = Running::start(&dir);

    let body: &[u8] = &[b'x'; 1500];
    let reply = call(&gw, "POST", "/call/orders/v1/items?page=2", body).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["body_len"], 1500, "the instance got it whole");
    let id = request_id(&reply);
    let line = access_line(&mut gw, &id);
    assert_eq!(line["request_id"], id.as_str());
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["service"], "orders");
    assert_eq!(line["path"], "/v1/items", "the query is left out");
    assert_eq!(line["instance"], instance_of(&echo.url()));
    assert_eq!(
        reply.header("x-switchyard-upstream"),
        line["instance"].as_str()
    );
    assert_eq!(line["status"], 200);
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["bytes_in"], 1500);
    assert_eq!(line["bytes_out"], reply.body.len());
    assert!(
        line["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{line}"
    );

    // Every line is JSON: the ones before the call, and the ones on the
    // way out, which are written before the process exits.
    let before = gw.seen.clone();
    let (status, after) = gw.terminate();
    assert!(status.success());
    assert!(
        after.iter().any(|l| l.contains("shutting down")),
        "{after:?}"
    );
    assert!(before.iter().any(|l| l.contains("switchyard listening")));
    for line in before.iter().chain(&after) {
        let json: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(json["timestamp"].is_string(), "{line}");
        assert!(
            json["level"].is_string() && json["target"].is_string(),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_logs_both_attempts_and_the_instance_that_answered() {
    // Whichever instance the first attempt picks answers 503 (retried by
    // default); the retry goes to the other one, which answers 200.
    let first = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let upstream = || {
        let (first, hits) = (first.clone(), hits.clone());
        Upstream::start(move |_| {
            hits.fetch_add(1, Ordering::SeqCst);
            let failed = first.swap(false, Ordering::SeqCst);
            async move { common::response(if failed { 503 } else { 200 }, "fine") }
        })
    };
    let (one, two) = (upstream().await, upstream().await);
    let dir = TempDir::new("access-retry");
    config(&dir, true, "json", &[("pair", vec![one.url(), two.url()])]);
    let mut gw = Running::start(&dir);

    let reply = call(&gw, "GET", "/call/pair/", b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    let answered = reply.header("x-switchyard-upstream").unwrap().to_string();
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(
        (one.connections(), two.connections()),
        (1, 1),
        "one at each"
    );
    let line = access_line(&mut gw, &request_id(&reply));
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["instance"], answered.as_str(), "the last attempt's");
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/");
    assert_eq!(line["bytes_in"], 0);
    assert_eq!(line["bytes_out"], 4);
}

/// A large answer is spliced from socket to socket, never read into the
/// gateway (src/splice.rs): its line still counts every byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_spliced_through_is_logged_with_every_byte() {
    const LEN: usize = 700_001;
    let upstream = Upstream::start(|_| async { common::response(200, vec![b'z'; LEN]) }).await;
    let dir = TempDir::new("access-spliced");
    config(&dir, true, "json", &[("files", vec![upstream.url()])]);
    let mut gw = Running::start(&dir);

    let reply = call(&gw, "GET", "/call/files/big", b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.len() == LEN && reply.body.iter().all(|&b| b == b'z'));
    let line = access_line(&mut gw, &request_id(&reply));
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_out"], LEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_an_unknown_service_is_logged_without_an_instance() {
    let dir = TempDir::new("access-unknown");
    config(&dir, true, "json", &[]);
    let mut gw = Running::start(&dir);

    let reply = call(&gw, "DELETE", "/call/nowhere/a/b", b"").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "no_healthy_instance");
    let line = access_line(&mut gw, &request_id(&reply));
    assert_eq!(line["method"], "DELETE");
    assert_eq!(line["service"], "nowhere");
    assert_eq!(line["path"], "/a/b");
    assert_eq!(line["instance"], "-");
    assert_eq!(line["attempts"], 0);
    assert_eq!(line["status"], 503);
    assert_eq!(line["bytes_out"], reply.body.len());
}

/// The `key=value` fields of a text line, values unquoted.
fn fields(line: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        let after = &rest[eq + 1..];
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').expect("a closing quote");
                (quoted[..end].to_string(), &quoted[end + 1..])
            }
            None => {
                let end = after.find(' ').unwrap_or(after.len());
                (after[..end].to_string(), &after[end..])
            }
        };
        fields.push((key, value));
        rest = next;
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_are_one_line_of_key_value_fields() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("access-text");
    config(&dir, true, "text", &[("orders", vec![echo.url()])]);
    let mut gw = Running::start(&dir);

    let reply = call(&gw, "PUT", "/call/orders/items/7", b"hello").await;
    assert_eq!(reply.status, StatusCode::OK);
    let id = request_id(&reply);
    let line = gw.wait_for(&id);
    assert!(line.contains(" INFO switchyard::access: "), "{line}");
    assert!(serde_json::from_str::<Value>(&line).is_err(), "{line}");
    let fields = fields(&line);
    let expected = [
        ("request_id", id.as_str()),
        ("method", "PUT"),
        ("service", "orders"),
        ("path", "/items/7"),
        ("instance", &instance_of(&echo.url())),
        ("status", "200"),
        ("attempts", "1"),
        ("bytes_in", "5"),
        ("bytes_out", &reply.body.len().to_string()),
    ];
    for (key, value) in expected {
        assert!(
            fields.iter().any(|(k, v)| k == key && v == value),
            "{key}={value} in {line}"
        );
    }
    let duration = fields
        .iter()
        .find(|(k, _)| k == "duration_ms")
        .expect("a duration");
    assert!(duration.1.parse::<f64>().is_ok_and(|ms| ms > 0.0), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_access_log_off_a_call_writes_no_line() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("access-off");
    config(&dir, false, "json", &[("orders", vec![echo.url()])]);
    let mut gw = Running::start(&dir);

    let reply = call(&gw, "POST", "/call/orders/x", b"body").await;
    assert_eq!(reply.status, StatusCode::OK);
    let id = request_id(&reply);
    // A line written after the call: one for the call would come before it.
    let registration = serde_json::json!({"name": "later", "url": "http://127.0.0.1:9"});
    let (status, _) = gw
        .send(http::Method::POST, "/services", Some(registration))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    gw.wait_for("\"later\"");
    assert!(
        !gw.seen
            .iter()
            .any(|l| l.contains("switchyard::access") || l.contains(&id)),
        "{:#?}",
        gw.seen
    );
    assert!(
        gw.seen
            .iter()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{:#?}",
        gw.seen
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_call_gets_the_same_line() {
    let echo = Echo::start("a").await;
    let dir = TempDir::new("access-h2");
    config(&dir, true, "json", &[("orders", vec![echo.url()])]);
    let mut gw = Running::start(&dir);

    let h2 = Caller::new(gw.addr.parse().unwrap(), Some(Way::H2c));
    let request = Request::post(gw.url("/call/orders/h2"))
        .body(Full::new(Bytes::from_static(&[b'y'; 3000])))
        .unwrap();
    let reply = h2.send(request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["body_len"], 3000);
    let line = access_line(&mut gw, &request_id(&reply));
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/h2");
    assert_eq!(line["status"], 200);
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["bytes_in"], 3000);
    assert_eq!(line["bytes_out"], reply.body.len());
}
