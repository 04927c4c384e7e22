//! The status page (SPEC §9): the snapshot `/status.json` over HTTP, and
//! the page `/status` in a real browser, following the gateway without a
//! reload.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use common::browser::{Browser, Tab};
use common::{Echo, TestGateway, Upstream, Way, dead_url, each_way, eventually, response};

/// Checks every 200 ms; one failure makes an instance unhealthy.
const CHECKED: &str = r#"
[gateway]
name = "edge-test"
[health_check]
interval = "200ms"
timeout = "1s"
unhealthy_threshold = 1
"#;

async fn register(gw: &TestGateway, body: Value) {
    let reply = gw.post_json("/services", &body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
}

/// `count` instances of `service`, `<service>-00` on, all at `url`.
async fn register_many(gw: &TestGateway, service: &str, url: &str, count: usize) {
    for n in 0..count {
        let id = format!("{service}-{n:02}");
        register(gw, json!({"name": service, "url": url, "id": id})).await;
    }
}

async fn snapshot(gw: &TestGateway) -> Value {
    let reply = gw.get("/status.json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    reply.json()
}

fn service<'a>(snapshot: &'a Value, name: &str) -> &'a Value {
    snapshot["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {snapshot}"))
}

fn instance<'a>(service: &'a Value, id: &str) -> &'a Value {
    service["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("no instance {id} in {service}"))
}

async fn the_snapshot_shows_every_service_and_instance_as_the_registry_has_it(way: Way) {
    let gw = TestGateway::start_way(CHECKED, way).await;
    let up = Echo::start("up").await;
    let down = dead_url().await;
    register(
        &gw,
        json!({"name": "web", "url": up.url(), "id": "web-up",
        "metadata": {"zone": "a"}}),
    )
    .await;
    register(&gw, json!({"name": "web", "url": down, "id": "web-down"})).await;
    register(
        &gw,
        json!({"name": "web", "url": up.url(), "id": "web-drained"}),
    )
    .await;
    let drained = gw
        .put_json(
            "/services/web/instances/web-drained/state",
            &json!({"state": "draining"}),
        )
        .await;
    assert_eq!(drained.status, StatusCode::OK, "{}", drained.text());
    register_many(&gw, "search", &up.url(), 25).await;

    // Until every instance has been checked once.
    eventually(
        Duration::from_secs(10),
        "every instance checked",
        || async {
            let now = snapshot(&gw).await;
            now["services"].as_array().unwrap().iter().all(|s| {
                s["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|i| !i["check"].is_null())
            })
        },
    )
    .await;
    let now = snapshot(&gw).await;

    assert_eq!(now["gateway"], "edge-test");
    assert!(
        humantime::parse_rfc3339(now["at"].as_str().unwrap()).is_ok(),
        "{}",
        now["at"]
    );
    assert_eq!(now["instances"], 28);
    assert_eq!(now["routable"], 26);
    let names: Vec<_> = now["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["search", "web"]);

    // The large service: every instance, in registration order.
    let search = service(&now, "search");
    assert_eq!(
        (&search["total"], &search["routable"]),
        (&json!(25), &json!(25))
    );
    let ids: Vec<_> = search["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<_> = (0..25).map(|n| format!("search-{n:02}")).collect();
    assert_eq!(ids, expected);

    let web = service(&now, "web");
    assert_eq!((&web["total"], &web["routable"]), (&json!(3), &json!(1)));
    // No request went through /call: nothing to show for the last minute.
    assert_eq!(
        web["recent"],
        json!({"requests_per_sec": 0.0, "error_ratio": 0.0, "p99_seconds": null})
    );

    let healthy = instance(web, "web-up");
    assert_eq!(healthy["url"], up.url());
    assert_eq!(
        (
            &healthy["state"],
            &healthy["health"],
            &healthy["circuit"],
            &healthy["routable"]
        ),
        (
            &json!("active"),
            &json!("healthy"),
            &json!("closed"),
            &json!(true)
        )
    );
    assert!(healthy.get("reason").is_none(), "{healthy}");
    assert_eq!(healthy["metadata"], json!({"zone": "a"}));
    assert_eq!(healthy["check"]["ok"], true);
    assert_eq!(healthy["check"]["result"], "status 200");
    assert!(healthy["check"]["ago_ms"].as_u64().is_some(), "{healthy}");
    assert!(
        healthy["check"]["duration_ms"].as_u64().is_some(),
        "{healthy}"
    );

    let dead = instance(web, "web-down");
    assert_eq!(dead["health"], "unhealthy");
    assert_eq!(dead["routable"], false);
    assert_eq!(dead["check"]["ok"], false);
    assert_eq!(dead["check"]["result"], "connection refused");
    assert!(
        dead["reason"].as_str().unwrap().starts_with("unhealthy: "),
        "{dead}"
    );

    let drained = instance(web, "web-drained");
    assert_eq!(drained["state"], "draining");
    assert_eq!(drained["reason"], "draining");

    // The registry API and the snapshot make the same decision.
    let api = gw.get("/services/web").await.json();
    for listed in api["instances"].as_array().unwrap() {
        let shown = instance(web, listed["id"].as_str().unwrap());
        assert_eq!(shown["routable"], listed["routable"], "{shown} vs {listed}");
        assert_eq!(shown["health"], listed["status"], "{shown} vs {listed}");
    }
}

async fn page_and_snapshot_are_open_reads_that_no_cache_keeps(way: Way) {
    let gw = TestGateway::start_way("[gateway]\nadmin_token = \"s3cret\"", way).await;
    let refused = gw
        .post_json(
            "/services",
            &json!({"name": "web", "url": "http://10.0.0.1"}),
        )
        .await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "writes need the token"
    );

    let page = gw.get("/status").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(
        page.text().starts_with("<!doctype html>"),
        "{}",
        page.text()
    );

    let empty = snapshot(&gw).await;
    assert_eq!(
        (&empty["instances"], &empty["services"]),
        (&json!(0), &json!([]))
    );

    for path in ["/status", "/status.json"] {
        let head = gw.request(Method::HEAD, path, "", &[]).await;
        assert_eq!(head.status, StatusCode::OK, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path}");
        assert_eq!(head.header("cache-control"), Some("no-store"));
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            let reply = gw.request(method.clone(), path, "", &[]).await;
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(reply.error_code(), "method_not_allowed");
            assert_eq!(reply.header("allow"), Some("GET, HEAD"));
        }
    }
    assert_eq!(gw.get("/status/").await.error_code(), "not_found");
}

/// An upstream whose `/health` passes while `healthy` holds; everything
/// else gets 200.
async fn switchable(healthy: Arc<AtomicBool>) -> Upstream {
    Upstream::start(move |request: http::Request<hyper::body::Incoming>| {
        let healthy = healthy.clone();
        async move {
            let failing = request.uri().path() == "/health" && !healthy.load(Ordering::SeqCst);
            response(if failing { 500 } else { 200 }, "")
        }
    })
    .await
}

/// The cells of the row of instance `id`, as rendered; `None` while the
/// page shows no such row.
async fn row(tab: &Tab<'_>, id: &str) -> Option<Vec<String>> {
    let expression = format!(
        "(() => {{
            for (const td of document.querySelectorAll('td.id')) {{
                if (td.textContent === {id:?}) return Array.from(td.parentElement.cells, c => c.innerText);
            }}
            return null;
        }})()"
    );
    serde_json::from_value(tab.evaluate(&expression).await).expect("cells are strings")
}

/// The summary line of `service`, and whether its instances are shown.
async fn summary(tab: &Tab<'_>, service: &str) -> (String, bool) {
    let expression = format!(
        "(() => {{
            for (const d of document.querySelectorAll('details')) {{
                if (d.querySelector('summary .name').textContent === {service:?})
                    return [d.querySelector('summary').innerText, d.open];
            }}
            return ['', false];
        }})()"
    );
    serde_json::from_value(tab.evaluate(&expression).await).expect("[text, open]")
}

async fn click_summary(tab: &Tab<'_>, service: &str) {
    tab.evaluate(&format!(
        "[...document.querySelectorAll('summary')]
            .find(s => s.querySelector('.name').textContent === {service:?}).click()"
    ))
    .await;
}

/// Waits for the page to take in one more snapshot.
async fn next_snapshot(tab: &Tab<'_>) {
    let updated = "document.getElementById('updated').textContent";
    let before = tab.evaluate(updated).await;
    eventually(
        Duration::from_secs(10),
        "a new snapshot on the page",
        || async { tab.evaluate(updated).await != before },
    )
    .await;
}

// The snapshot and the page over a fresh HTTP/1.1 connection, one that
// carried a request first, and HTTP/2.
each_way! {
    the_snapshot_shows_every_service_and_instance_as_the_registry_has_it,
    page_and_snapshot_are_open_reads_that_no_cache_keeps,
}

#[tokio::test]
async fn the_page_follows_the_gateway_without_a_reload() {
    let healthy = Arc::new(AtomicBool::new(true));
    let web = switchable(healthy.clone()).await;
    let search = switchable(Arc::new(AtomicBool::new(true))).await;
    let gw = TestGateway::start(CHECKED).await;
    let markup = "<img src=x onerror=\"document.title='owned'\">";
    register(
        &gw,
        json!({"name": "web", "url": web.url(), "id": "web-1",
        "metadata": {"owner": markup}}),
    )
    .await;
    register_many(&gw, "search", &search.url(), 25).await;

    let browser = Browser::launch().await;
    let tab = browser.open(&gw.url("/status")).await;
    let within = Duration::from_secs(20);
    eventually(within, "the page shows web-1 healthy", || async {
        row(&tab, "web-1")
            .await
            .is_some_and(|cells| cells[3] == "healthy")
    })
    .await;

    // What a person sees: the small service's instance, its metadata as
    // the text it is, and the large service collapsed to its summary.
    let cells = row(&tab, "web-1").await.unwrap();
    assert_eq!(cells[0], "web-1");
    assert_eq!(cells[1], web.url());
    assert_eq!(cells[2], "active");
    assert_eq!(cells[4], "closed");
    assert_eq!(cells[5], "routable");
    assert!(cells[6].contains("status 200"), "{cells:?}");
    assert_eq!(cells[7], format!("owner={markup}"));
    assert_eq!(
        tab.evaluate("document.querySelectorAll('img').length")
            .await,
        0
    );
    let text = tab.text().await;
    assert!(text.contains("edge-test"), "{text}");
    let (search_line, open) = summary(&tab, "search").await;
    assert!(search_line.contains("25/25 routable"), "{search_line}");
    assert!(
        search_line.contains("req/s") && search_line.contains("p99 –"),
        "{search_line}"
    );
    assert!(!open, "more than 20 instances start collapsed");
    assert!(!text.contains("search-00"), "{text}");

    // A health change appears in place.
    tab.evaluate("window.loadedOnce = true").await;
    healthy.store(false, Ordering::SeqCst);
    eventually(within, "the page shows web-1 unhealthy", || async {
        row(&tab, "web-1").await.is_some_and(|cells| {
            cells[3] == "unhealthy" && cells[5].starts_with("not routable: unhealthy")
        })
    })
    .await;
    let (web_line, _) = summary(&tab, "web").await;
    assert!(web_line.contains("0/1 routable"), "{web_line}");

    // The reader's choice survives the updates.
    click_summary(&tab, "search").await;
    next_snapshot(&tab).await;
    assert!(summary(&tab, "search").await.1, "opened by the reader");
    assert_eq!(row(&tab, "search-24").await.unwrap()[0], "search-24");
    click_summary(&tab, "web").await;
    next_snapshot(&tab).await;
    assert!(!summary(&tab, "web").await.1, "closed by the reader");
    assert!(!tab.text().await.contains("web-1"));

    // The gateway out of reach, then back.
    tab.set_offline(true).await;
    eventually(within, "the page says it is disconnected", || async {
        tab.text().await.contains("Disconnected")
    })
    .await;
    tab.set_offline(false).await;
    eventually(within, "the page is live again", || async {
        let text = tab.text().await;
        !text.contains("Disconnected") && text.contains("live")
    })
    .await;
    assert_eq!(
        tab.evaluate("window.loadedOnce === true").await,
        true,
        "no reload"
    );
}
