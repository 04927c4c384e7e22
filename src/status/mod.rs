//! The status page (SPEC §9): `GET /status`, one self-contained HTML page,
//! and `GET /status.json`, the snapshot that page polls every two seconds.
//!
//! The page is a static file (`page.html`: inline CSS and a little vanilla
//! JavaScript, no build step) compiled into the binary, so it works on a
//! gateway with no network beyond its own. All it shows comes from the
//! snapshot; the page only lays it out, and updates the rows that changed in
//! place, so a thousand instances stay cheap to watch.
//!
//! Each instance in the snapshot is read once through
//! [`balance::explain`], the same decision the picker makes, so the page
//! never shows `routable` next to `unhealthy`. Nothing here touches the
//! request path: the snapshot is built only when someone asks for it.
//!
//! The snapshot, `application/json`; absent keys are noted:
//!
//! ```text
//! {
//!   "gateway": "registry",                    the gateway's name
//!   "at": "2026-12-02T10:00:00.000Z",         when the snapshot was taken
//!   "instances": 27, "routable": 25,          totals over every service
//!   "services": [                             sorted by name
//!     { "name": "users", "total": 4, "routable": 3,
//!       "recent": {                           the last minute
//!         "requests_per_sec": 12.5,
//!         "error_ratio": 0.01,                5xx share, 0 to 1
//!         "p99_seconds": 0.042 },             null without requests
//!       "instances": [                        in registration order
//!         { "id": "10.0.0.1:8080", "url": "http://10.0.0.1:8080",
//!           "state": "active",                or "draining"
//!           "health": "healthy",              "unknown", "unhealthy"
//!           "circuit": "closed",              "open", "half_open"
//!           "routable": false,
//!           "reason": "circuit open until …", absent when routable
//!           "metadata": {"zone": "a"},        absent when empty
//!           "check": {                        absent before the first check
//!             "ago_ms": 812,                  before "at"
//!             "ok": true,
//!             "result": "status 200",         or the error: "connection refused"
//!             "duration_ms": 3 } } ] } ] }
//! ```
//!
//! `ago_ms` is counted on the gateway's clock, so the page needs no clock
//! of its own to agree with it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, header};
use serde::Serialize;
use tokio::time::Instant;

use crate::balance;
use crate::body::{self, Body};
use crate::breaker::CircuitState;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::metrics::Recent;
use crate::registry::{HealthStatus, Instance, InstanceState, LastCheck, ServiceEntry};

/// Where the page is served.
pub const PAGE_PATH: &str = "/status";
/// Where the snapshot the page polls is served.
pub const SNAPSHOT_PATH: &str = "/status.json";

const PAGE: &str = include_str!("page.html");

/// Serves `GET /status`: the page.
pub fn page(method: &Method) -> Result<Response<Body>, GatewayError> {
    read_only(method)?;
    Ok(answer(
        "text/html; charset=utf-8",
        Bytes::from_static(PAGE.as_bytes()),
    ))
}

/// Serves `GET /status.json`: the snapshot of `gateway` as of now.
pub fn snapshot(method: &Method, gateway: &Gateway) -> Result<Response<Body>, GatewayError> {
    read_only(method)?;
    let services = gateway.registry().services();
    let config = gateway.config();
    let now = Instant::now();
    let snapshot = Snapshot::of(
        &config.gateway.name,
        &services,
        |name| {
            gateway
                .registry()
                .get(name)
                .map_or_else(Recent::default, |service| service.stats().recent(now))
        },
        now,
        SystemTime::now(),
    )
    .with_reloads(gateway.reloads());
    // It holds only strings, numbers and string maps: it serializes.
    let json = serde_json::to_vec(&snapshot).unwrap_or_default();
    Ok(answer("application/json", Bytes::from(json)))
}

pub(crate) fn read_only(method: &Method) -> Result<(), GatewayError> {
    match *method {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(GatewayError::method_not_allowed("GET, HEAD")),
    }
}

/// A 200 that no cache keeps: the page shows live state.
pub(crate) fn answer(content_type: &'static str, bytes: Bytes) -> Response<Body> {
    let mut response = Response::new(body::full(bytes));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The whole gateway at one moment, as the page shows it.
#[derive(Debug, Serialize)]
pub struct Snapshot<'a> {
    gateway: &'a str,
    at: String,
    instances: usize,
    routable: usize,
    services: Vec<ServiceStatus<'a>>,
    /// Configuration reloads, once there has been one.
    #[serde(skip_serializing_if = "Option::is_none")]
    reloads: Option<ReloadStatus>,
}

/// The reloads so far, and how the last one ended.
#[derive(Debug, Serialize)]
struct ReloadStatus {
    succeeded: u64,
    failed: u64,
    last_at: String,
    /// Why the last one was refused; absent when it applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct ServiceStatus<'a> {
    name: &'a str,
    total: usize,
    routable: usize,
    recent: Recent,
    instances: Vec<InstanceStatus<'a>>,
}

#[derive(Debug, Serialize)]
struct InstanceStatus<'a> {
    id: &'a str,
    url: &'a str,
    state: InstanceState,
    health: HealthStatus,
    circuit: CircuitState,
    routable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<CheckStatus>,
}

#[derive(Debug, Serialize)]
struct CheckStatus {
    ago_ms: u64,
    ok: bool,
    result: String,
    duration_ms: u64,
}

impl<'a> Snapshot<'a> {
    /// `services` as of `now`, which is `wall` on the wall clock, with each
    /// service's last minute from `recent`.
    pub fn of(
        gateway: &'a str,
        services: &'a [std::sync::Arc<ServiceEntry>],
        recent: impl Fn(&str) -> Recent,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let services: Vec<_> = services
            .iter()
            .map(|entry| ServiceStatus::of(entry, recent(entry.name()), now, wall))
            .collect();
        Self {
            gateway,
            at: humantime::format_rfc3339_millis(wall).to_string(),
            instances: services.iter().map(|s| s.total).sum(),
            routable: services.iter().map(|s| s.routable).sum(),
            services,
            reloads: None,
        }
    }

    /// With `reloads`, when there has been one.
    fn with_reloads(mut self, reloads: crate::reload::Reloads) -> Self {
        self.reloads = reloads.last.map(|last| ReloadStatus {
            succeeded: reloads.succeeded,
            failed: reloads.failed,
            last_at: humantime::format_rfc3339_seconds(last.at).to_string(),
            last_error: last.result.err(),
        });
        self
    }
}

impl<'a> ServiceStatus<'a> {
    fn of(entry: &'a ServiceEntry, recent: Recent, now: Instant, wall: SystemTime) -> Self {
        let instances: Vec<_> = entry
            .instances()
            .iter()
            .map(|i| InstanceStatus::of(i, now, wall))
            .collect();
        Self {
            name: entry.name(),
            total: instances.len(),
            routable: instances.iter().filter(|i| i.routable).count(),
            recent,
            instances,
        }
    }
}

impl<'a> InstanceStatus<'a> {
    fn of(instance: &'a Instance, now: Instant, wall: SystemTime) -> Self {
        let explained = balance::explain(instance, now);
        Self {
            id: instance.id(),
            url: instance.url().as_str(),
            state: explained.state,
            health: explained.health.status,
            circuit: explained.circuit.state,
            routable: explained.is_routable(),
            reason: explained.reason(wall),
            metadata: instance.metadata(),
            check: explained
                .health
                .last_check
                .as_ref()
                .map(|check| CheckStatus::of(check, wall)),
        }
    }
}

impl CheckStatus {
    fn of(check: &LastCheck, wall: SystemTime) -> Self {
        let ago = wall.duration_since(check.at).unwrap_or(Duration::ZERO);
        Self {
            ago_ms: millis(ago),
            ok: check.ok,
            result: check.result.to_string(),
            duration_ms: millis(check.duration),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::FailureCause;
    use crate::config::Config;
    use crate::registry::{CheckResult, HealthChecker, Registered, Registration, Registry};
    use std::sync::Arc;

    fn registry() -> Registry {
        let config = Arc::new(Config::from_toml("[health_check]\ninterval = \"0s\"").unwrap());
        let token = tokio_util::sync::CancellationToken::new();
        Registry::new(config, HealthChecker::new(token))
    }

    fn register(registry: &Registry, service: &str, url: &str) -> Arc<Instance> {
        let registration = Registration {
            name: service.into(),
            url: url.into(),
            ..Registration::default()
        };
        match registry.register(registration).unwrap() {
            Registered::Created(i) | Registered::Existing(i) => i,
        }
    }

    /// 2026-12-02T10:00:00Z.
    fn wall() -> SystemTime {
        humantime::parse_rfc3339("2026-12-02T10:00:00Z").unwrap()
    }

    /// One check that ended `seconds_before` the snapshot's moment.
    fn checked(instance: &Instance, result: CheckResult, seconds_before: u64) {
        let check = LastCheck {
            at: wall() - Duration::from_secs(seconds_before),
            ok: matches!(result, CheckResult::Status(200)),
            result,
            duration: Duration::from_millis(4),
        };
        instance.health().record(check, 1, 1);
    }

    fn json(registry: &Registry, recent: impl Fn(&str) -> Recent) -> serde_json::Value {
        let services = registry.services();
        let snapshot = Snapshot::of("edge-1", &services, recent, Instant::now(), wall());
        serde_json::to_value(&snapshot).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn every_instance_with_its_state_and_the_reason_it_is_not_routable() {
        let registry = registry();
        let fine = register(&registry, "users", "http://10.0.0.1:80");
        let sick = register(&registry, "users", "http://10.0.0.2:80");
        let drained = register(&registry, "users", "http://10.0.0.3:80");
        let tripped = register(&registry, "users", "http://10.0.0.4:80");
        register(&registry, "billing", "http://10.0.1.1:80");
        checked(&fine, CheckResult::Status(200), 3);
        checked(&sick, CheckResult::Error("connection refused".into()), 1);
        drained.set_state(InstanceState::Draining);
        for _ in 0..3 {
            let permit = tripped.breaker().try_admit().unwrap();
            permit.failure(FailureCause::Status(500));
        }

        let json = json(&registry, |_| Recent::default());
        assert_eq!(json["gateway"], "edge-1");
        assert_eq!(json["at"], "2026-12-02T10:00:00.000Z");
        assert_eq!(json["instances"], 5);
        assert_eq!(json["routable"], 2);
        let names: Vec<_> = json["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["billing", "users"]);

        let users = &json["services"][1];
        assert_eq!(
            (users["total"].as_u64(), users["routable"].as_u64()),
            (Some(4), Some(1))
        );
        let instances = users["instances"].as_array().unwrap();
        assert_eq!(
            instances[0],
            serde_json::json!({
                "id": "10.0.0.1:80", "url": "http://10.0.0.1:80",
                "state": "active", "health": "healthy", "circuit": "closed",
                "routable": true,
                "check": {"ago_ms": 3000, "ok": true, "result": "status 200", "duration_ms": 4},
            })
        );
        assert_eq!(instances[1]["health"], "unhealthy");
        assert_eq!(instances[1]["routable"], false);
        assert_eq!(
            instances[1]["reason"],
            "unhealthy: 1 consecutive failed check, last: connection refused"
        );
        assert_eq!(instances[1]["check"]["result"], "connection refused");
        assert_eq!(instances[1]["check"]["ok"], false);
        assert_eq!(instances[2]["state"], "draining");
        assert_eq!(instances[2]["reason"], "draining");
        assert!(instances[2].get("check").is_none(), "never checked");
        assert_eq!(instances[3]["circuit"], "open");
        assert!(
            instances[3]["reason"]
                .as_str()
                .unwrap()
                .starts_with("circuit open until ")
        );
    }

    #[tokio::test]
    async fn each_service_carries_its_last_minute() {
        let registry = registry();
        register(&registry, "busy", "http://10.0.0.1:80");
        register(&registry, "idle", "http://10.0.0.2:80");
        let json = json(&registry, |name| match name {
            "busy" => Recent {
                requests_per_sec: 12.5,
                error_ratio: 0.25,
                p99_seconds: Some(0.042),
            },
            _ => Recent::default(),
        });
        assert_eq!(
            json["services"][0]["recent"],
            serde_json::json!({"requests_per_sec": 12.5, "error_ratio": 0.25, "p99_seconds": 0.042})
        );
        assert_eq!(
            json["services"][1]["recent"],
            serde_json::json!({"requests_per_sec": 0.0, "error_ratio": 0.0, "p99_seconds": null})
        );
    }

    #[tokio::test]
    async fn metadata_is_shown_when_there_is_some() {
        let registry = registry();
        let registration = Registration {
            name: "users".into(),
            url: "http://10.0.0.1:80".into(),
            metadata: [("zone".to_string(), "<b>a</b>".to_string())].into(),
            ..Registration::default()
        };
        registry.register(registration).unwrap();
        register(&registry, "users", "http://10.0.0.2:80");
        let json = json(&registry, |_| Recent::default());
        let instances = &json["services"][0]["instances"];
        assert_eq!(
            instances[0]["metadata"],
            serde_json::json!({"zone": "<b>a</b>"})
        );
        assert!(instances[1].get("metadata").is_none());
    }

    #[test]
    fn an_empty_gateway_is_an_empty_list() {
        let json = serde_json::to_value(Snapshot::of(
            "edge-1",
            &[],
            |_| Recent::default(),
            Instant::now(),
            wall(),
        ))
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "gateway": "edge-1", "at": "2026-12-02T10:00:00.000Z",
                "instances": 0, "routable": 0, "services": [],
            })
        );
    }

    #[test]
    fn only_reads_are_served() {
        assert!(page(&Method::GET).is_ok());
        assert!(page(&Method::HEAD).is_ok());
        let refused = page(&Method::POST).unwrap_err().into_response();
        assert_eq!(refused.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(refused.headers()[header::ALLOW], "GET, HEAD");
    }

    #[test]
    fn the_page_is_self_contained() {
        // No asset from anywhere, and data reaches the DOM only as text.
        let outside = ["src=", "href=", "@import", "url(", "innerHTML", "outerHTML"];
        let markup = ["insertAdjacentHTML", "document.write"];
        for outside in outside.into_iter().chain(markup) {
            assert!(!PAGE.contains(outside), "the page holds {outside:?}");
        }
        assert!(PAGE.contains("fetch(\"status.json\""));
    }
}
