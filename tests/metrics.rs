//! `GET /metrics` after a scripted scenario: requests, retries and a spent
//! retry budget, a circuit opening, a health flip, an instance removed;
//! every figure read back from the exposition text as Prometheus would.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Echo, TestGateway, Way, each_way, eventually};

/// One sample of the exposition: its name, labels and value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a text exposition (label values here hold no `,` `"`
/// or `}`; the encoder's quoting is not what is under test).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label");
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
            };
            Sample {
                name: name.to_string(),
                labels,
                value,
            }
        })
        .collect()
}

struct Scrape(Vec<Sample>, String);

impl Scrape {
    async fn of(gw: &TestGateway) -> Self {
        let reply = gw.get("/metrics").await;
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .header("content-type")
                .unwrap()
                .starts_with("text/plain; version=0.0.4"),
        );
        let text = reply.text();
        Self(parse(&text), text)
    }

    /// The one sample of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<_> = self
            .0
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
        found.first().map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.1))
    }

    fn mentions(&self, instance: &str) -> bool {
        self.0
            .iter()
            .any(|s| s.labels.get("instance").map(String::as_str) == Some(instance))
    }
}

// Every scrape and call goes over a fresh HTTP/1.1 connection, one that
// carried another request first, or HTTP/2.
each_way! {
    metrics_follow_a_scripted_scenario,
    every_family_of_the_spec_is_exposed_with_its_type,
}

const CONFIG: &str = r#"
[health_check]
interval = "0s"

[circuit_breaker]
failure_threshold = 1000

[retry]
max_attempts = 2
backoff_base = "1ms"
backoff_max = "1ms"
budget_ratio = 0.0
budget_min_per_sec = 1
"#;

async fn metrics_follow_a_scripted_scenario(way: Way) {
    let ok = Echo::start("ok").await;
    let flaky = Echo::start("flaky").await;
    flaky.set_status(503);
    let tripping = Echo::start("tripping").await;
    tripping.set_status(500);
    let checked = Echo::start("checked").await;
    let toml = format!(
        r#"{CONFIG}
[[services]]
name = "tripping"
urls = ["{tripping}"]
[services.circuit_breaker]
failure_threshold = 1

[[services]]
name = "checked"
urls = ["{checked}"]
[services.health_check]
interval = "100ms"
unhealthy_threshold = 1
"#,
        tripping = tripping.url(),
        checked = checked.url(),
    );
    let gw = TestGateway::start_way(&toml, way).await;
    let ok_id = gw.register("ok", &ok.url()).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let flaky_id = gw.register("flaky", &flaky.url()).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let id_of = |json: serde_json::Value| json["instances"][0]["id"].as_str().unwrap().to_string();
    let tripping_id = id_of(gw.get("/services/tripping").await.json());
    let checked_id = id_of(gw.get("/services/checked").await.json());

    for _ in 0..5 {
        assert_eq!(gw.get("/call/ok/hello").await.status, 200);
    }
    for _ in 0..20 {
        assert_eq!(gw.get("/call/flaky/").await.status, 503);
    }
    assert_eq!(gw.get("/call/tripping/").await.status, 500);

    let m = Scrape::of(&gw).await;
    // Requests by status, and their durations.
    let ok_labels = [("service", "ok")];
    assert_eq!(
        m.value(
            "switchyard_requests_total",
            &[("service", "ok"), ("status", "200")]
        ),
        5.0
    );
    assert_eq!(
        m.value("switchyard_request_duration_seconds_count", &ok_labels),
        5.0
    );
    assert_eq!(
        m.value(
            "switchyard_request_duration_seconds_bucket",
            &[("service", "ok"), ("le", "+Inf")]
        ),
        5.0
    );
    let bucket = |le| {
        m.value(
            "switchyard_request_duration_seconds_bucket",
            &[("service", "ok"), ("le", le)],
        )
    };
    assert!(bucket("0.00005") <= bucket("0.01") && bucket("0.01") <= bucket("30.0"));
    assert_eq!(bucket("30.0"), 5.0, "a local answer takes well under 30 s");
    assert!(m.value("switchyard_request_duration_seconds_sum", &ok_labels) > 0.0);
    let attempts = |m: &Scrape, service: &str, id: &str, outcome: &str| {
        m.value(
            "switchyard_upstream_attempts_total",
            &[("service", service), ("instance", id), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts(&m, "ok", &ok_id, "success"), 5.0);
    assert_eq!(attempts(&m, "ok", &ok_id, "error_status"), 0.0);

    // Every flaky request wanted one retry: the budget allowed some and
    // refused the rest, and each retry was one more attempt.
    let retries = m.value("switchyard_retries_total", &[("service", "flaky")]);
    let refused = m.value(
        "switchyard_retry_budget_exhausted_total",
        &[("service", "flaky")],
    );
    assert!(
        retries >= 1.0 && refused >= 1.0,
        "retries {retries}, refused {refused}"
    );
    assert_eq!(retries + refused, 20.0);
    assert_eq!(
        attempts(&m, "flaky", &flaky_id, "error_status"),
        20.0 + retries
    );
    assert_eq!(
        m.value(
            "switchyard_requests_total",
            &[("service", "flaky"), ("status", "503")]
        ),
        20.0
    );
    assert_eq!(
        m.value("switchyard_retries_total", &[("service", "ok")]),
        0.0
    );

    // One 500 opened the tripping instance's circuit.
    let tripping_labels = [("service", "tripping"), ("instance", tripping_id.as_str())];
    assert_eq!(m.value("switchyard_circuit_state", &tripping_labels), 2.0);
    let to = |m: &Scrape, state: &str| {
        m.value(
            "switchyard_circuit_transitions_total",
            &[("instance", tripping_id.as_str()), ("to", state)],
        )
    };
    assert_eq!(to(&m, "open"), 1.0);
    assert_eq!(to(&m, "closed"), 0.0);
    assert_eq!(
        m.value("switchyard_instance_routable", &tripping_labels),
        0.0
    );
    assert_eq!(
        m.value("switchyard_circuit_state", &[("instance", ok_id.as_str())]),
        0.0
    );
    assert_eq!(
        m.value(
            "switchyard_instance_routable",
            &[("instance", ok_id.as_str())]
        ),
        1.0
    );
    assert_eq!(m.value("switchyard_registry_instances", &[]), 4.0);
    assert!(m.value("switchyard_connections_open", &[]) >= 1.0);
    assert_eq!(
        m.value("switchyard_config_reloads_total", &[("result", "success")]),
        0.0
    );

    // The checked instance's health flips: its checks fail and it leaves
    // the routable set.
    let checked_labels = [("service", "checked"), ("instance", checked_id.as_str())];
    eventually(Duration::from_secs(10), "checks pass", || async {
        let m = Scrape::of(&gw).await;
        m.value(
            "switchyard_health_checks_total",
            &[("instance", checked_id.as_str()), ("result", "pass")],
        ) >= 1.0
    })
    .await;
    checked.set_status(503);
    eventually(
        Duration::from_secs(10),
        "the failed check is counted",
        || async {
            let m = Scrape::of(&gw).await;
            m.value(
                "switchyard_health_checks_total",
                &[("instance", checked_id.as_str()), ("result", "fail")],
            ) >= 1.0
                && m.value("switchyard_instance_routable", &checked_labels) == 0.0
        },
    )
    .await;

    // A removed instance's series go with it.
    let reply = gw.delete(&format!("/services/ok/instances/{ok_id}")).await;
    assert!(reply.status.is_success(), "{}", reply.status);
    let m = Scrape::of(&gw).await;
    assert!(!m.mentions(&ok_id), "{}", m.1);
    assert!(m.mentions(&flaky_id));
    assert_eq!(m.value("switchyard_registry_instances", &[]), 3.0);
}

async fn every_family_of_the_spec_is_exposed_with_its_type(way: Way) {
    let gw = TestGateway::start_way(CONFIG, way).await;
    let upstream = Echo::start("one").await;
    gw.register("one", &upstream.url()).await;
    assert_eq!(gw.get("/call/one/").await.status, 200);
    let text = Scrape::of(&gw).await.1;
    for (family, kind) in [
        ("switchyard_requests", "counter"),
        ("switchyard_request_duration_seconds", "histogram"),
        ("switchyard_upstream_attempts", "counter"),
        ("switchyard_retries", "counter"),
        ("switchyard_retry_budget_exhausted", "counter"),
        ("switchyard_circuit_state", "gauge"),
        ("switchyard_circuit_transitions", "counter"),
        ("switchyard_instance_routable", "gauge"),
        ("switchyard_health_checks", "counter"),
        ("switchyard_registry_instances", "gauge"),
        ("switchyard_connections_open", "gauge"),
        ("switchyard_config_reloads", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "{family} {kind} in\n{text}"
        );
    }
    // HEAD answers like GET; writes are refused.
    let reply = gw.request(http::Method::POST, "/metrics", "{}", &[]).await;
    assert_eq!(reply.status, 405);
}
