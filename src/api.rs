//! The registry's REST API (SPEC §3): handlers and their JSON shapes.
//!
//! Every handler returns `Result<Response, GatewayError>`; the error side
//! becomes the SPEC's JSON error in one place (`GatewayError::into_response`).
//! Bad input is refused before anything changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::balance::{self, Explained};
use crate::body::{self, Body, CollectError};
use crate::breaker::CircuitState;
use crate::error::{ErrorCode, GatewayError};
use crate::outcome::ClientFault;
use crate::registry::{
    CheckResult, HealthStatus, Instance, InstanceState, LastCheck, Registered, Registration,
    Registry, ServiceEntry, Write, Written,
};

/// Registry request bodies larger than this get 413.
pub const MAX_REGISTRY_BODY: usize = 64 * 1024;

/// Serves `GET /healthz`, the gateway's own liveness: 200
/// `{"status":"ok"}` while it serves, plus `degraded` saying why its
/// registry store cannot be reached when it cannot (writes are refused
/// meanwhile; routing goes on).
pub fn healthz(method: &Method, registry: &Registry) -> Result<Response<Body>, GatewayError> {
    match *method {
        Method::GET | Method::HEAD => {
            let body = match registry.store_unreachable() {
                None => serde_json::json!({"status": "ok"}),
                Some(why) => serde_json::json!({"status": "ok", "degraded": why}),
            };
            Ok(json(StatusCode::OK, &body))
        }
        _ => Err(GatewayError::method_not_allowed("GET, HEAD")),
    }
}

/// Serves every path under `/services`.
pub async fn handle<B>(
    registry: &Arc<Registry>,
    request: Request<B>,
) -> Result<Response<Body>, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::body::BoxError>,
{
    let path = request.uri().path();
    let rest = path.strip_prefix("/services").unwrap_or(path);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let segments = rest
        .split('/')
        .skip(1)
        .map(decode_segment)
        .collect::<Result<Vec<_>, _>>()?;
    let method = request.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
        [] if get => Ok(list_services(registry)),
        [] if method == Method::POST => register(registry, request).await,
        [] => Err(GatewayError::method_not_allowed("GET, HEAD, POST")),
        [name] if get => {
            let entry = registry.service(name)?;
            Ok(json(StatusCode::OK, &ServiceView::of(&entry)))
        }
        [name] if method == Method::DELETE => {
            let service = name.to_string();
            registry.write(Write::RemoveService { service }).await?;
            Ok(no_content())
        }
        [_] => Err(GatewayError::method_not_allowed("GET, HEAD, DELETE")),
        [name, "health"] if get => {
            let refresh = query_flag(request.uri().query(), "refresh");
            health(registry, name, refresh).await
        }
        [_, "health"] => Err(GatewayError::method_not_allowed("GET, HEAD")),
        [name, "instances"] if get => {
            let entry = registry.service(name)?;
            let views: Vec<_> = entry
                .instances()
                .iter()
                .map(|i| InstanceView::of(i))
                .collect();
            Ok(json(StatusCode::OK, &views))
        }
        [_, "instances"] => Err(GatewayError::method_not_allowed("GET, HEAD")),
        [name, "instances", id] if get => {
            let entry = registry.service(name)?;
            Ok(json(StatusCode::OK, &InstanceView::of(entry.instance(id)?)))
        }
        [name, "instances", id] if method == Method::DELETE => {
            let (service, id) = (name.to_string(), id.to_string());
            registry
                .write(Write::RemoveInstance { service, id })
                .await?;
            Ok(no_content())
        }
        [_, "instances", _] => Err(GatewayError::method_not_allowed("GET, HEAD, DELETE")),
        [name, "instances", id, "heartbeat"] if method == Method::PUT => {
            let (service, id) = (name.to_string(), id.to_string());
            let written = registry.write(Write::Heartbeat { service, id }).await?;
            Ok(instance_answer(written))
        }
        [_, "instances", _, "heartbeat"] => Err(GatewayError::method_not_allowed("PUT")),
        [name, "instances", id, "state"] if method == Method::PUT => {
            let (service, id) = (name.to_string(), id.to_string());
            let body: StateBody = read_json(request).await?;
            let Some(state) = body.state.as_str().and_then(InstanceState::parse) else {
                return Err(GatewayError::new(
                    ErrorCode::InvalidJson,
                    format!(
                        "\"state\" must be \"draining\" or \"active\", got {}",
                        body.state
                    ),
                ));
            };
            let draining = state == InstanceState::Draining;
            let written = registry
                .write(Write::SetState {
                    service,
                    id,
                    draining,
                })
                .await?;
            Ok(instance_answer(written))
        }
        [_, "instances", _, "state"] => Err(GatewayError::method_not_allowed("PUT")),
        _ => Err(not_found(path)),
    }
}

/// The answer for a path no route serves.
pub fn not_found(path: &str) -> GatewayError {
    let shown: String = path.chars().take(200).collect();
    GatewayError::new(
        ErrorCode::NotFound,
        format!("nothing is served at {shown:?}"),
    )
}

fn list_services(registry: &Registry) -> Response<Body> {
    let services = registry.services();
    let views: Vec<_> = services.iter().map(|s| ServiceView::of(s)).collect();
    json(StatusCode::OK, &views)
}

/// `GET /services/<name>/health`: 200 while the service has a routable
/// instance, else 503; `refresh=true` checks every instance first.
async fn health(
    registry: &Registry,
    name: &str,
    refresh: bool,
) -> Result<Response<Body>, GatewayError> {
    let mut entry = registry.service(name)?;
    if refresh {
        // Concurrently; the checker bounds checks gateway-wide. Dropping the
        // set (the client went away) aborts the checks still running.
        let mut checks = tokio::task::JoinSet::new();
        for instance in entry.instances() {
            let checker = registry.checker().clone();
            let policy = entry.policy().clone();
            let instance = instance.clone();
            checks.spawn(async move { checker.check(&instance, &policy.health_check).await });
        }
        while checks.join_next().await.is_some() {}
        // Instances may have come or gone while checking.
        entry = registry.service(name)?;
    }
    let status = if entry.has_routable(Instant::now()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json(status, &ServiceView::of(&entry)))
}

#[derive(Deserialize)]
struct RegisterBody {
    name: String,
    url: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    /// A duration string, 1 s to 1 h; taken as any JSON value so that a
    /// wrong type gets the same message naming the field.
    #[serde(default)]
    ttl: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct StateBody {
    #[serde(default)]
    state: serde_json::Value,
}

/// The shortest and longest TTL a registration may ask for.
const TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

async fn register<B>(
    registry: &Arc<Registry>,
    request: Request<B>,
) -> Result<Response<Body>, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::body::BoxError>,
{
    let parsed: RegisterBody = read_json(request).await?;
    let ttl = match &parsed.ttl {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => match value.as_str().map(humantime::parse_duration) {
            Some(Ok(ttl)) if TTL_RANGE.contains(&ttl) => Some(ttl),
            _ => {
                return Err(GatewayError::new(
                    ErrorCode::InvalidJson,
                    format!("\"ttl\" must be a duration from 1s to 1h (\"15s\"), got {value}"),
                ));
            }
        },
    };
    let written = registry
        .write(Write::Register(Registration {
            name: parsed.name,
            url: parsed.url,
            id: parsed.id,
            metadata: parsed.metadata.unwrap_or_default(),
            ttl,
        }))
        .await?;
    let Written::Registered(registered) = written else {
        return Err(GatewayError::new(
            ErrorCode::StoreUnavailable,
            "the registration was not made",
        ));
    };
    let (status, instance) = match registered {
        Registered::Created(instance) => (StatusCode::CREATED, instance),
        Registered::Existing(instance) => (StatusCode::OK, instance),
    };
    let mut response = json(status, &InstanceView::of(&instance));
    let location = format!(
        "/services/{}/instances/{}",
        instance.service(),
        instance.id()
    );
    if let Ok(location) = HeaderValue::try_from(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// The instance a heartbeat or a drain left, as the answer.
fn instance_answer(written: Written) -> Response<Body> {
    match written {
        Written::Instance(instance) => json(StatusCode::OK, &InstanceView::of(&instance)),
        _ => no_content(),
    }
}

/// A registry request's JSON body, of at most [`MAX_REGISTRY_BODY`] bytes.
async fn read_json<B, T>(request: Request<B>) -> Result<T, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::body::BoxError>,
    T: serde::de::DeserializeOwned,
{
    if let Some(content_type) = request.headers().get(header::CONTENT_TYPE)
        && !is_json(content_type)
    {
        return Err(GatewayError::new(
            ErrorCode::UnsupportedMediaType,
            "registry requests take Content-Type: application/json",
        ));
    }
    // The body's size hint carries its Content-Length.
    let declared = request.body().size_hint().exact();
    if declared.is_some_and(|len| len > MAX_REGISTRY_BODY as u64) {
        return Err(body_too_large());
    }
    let bytes = match body::collect_capped(request.into_body(), MAX_REGISTRY_BODY).await {
        Ok(bytes) => bytes,
        Err(CollectError::TooLarge) => return Err(body_too_large()),
        Err(CollectError::Broken(e)) => return Err(ClientFault::of(&*e).into_error()),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(GatewayError::new(
            ErrorCode::InvalidJson,
            "the request body is empty; expected a JSON object",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}")))
}

fn is_json(content_type: &HeaderValue) -> bool {
    let Ok(value) = content_type.to_str() else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

fn body_too_large() -> GatewayError {
    GatewayError::new(
        ErrorCode::BodyTooLarge,
        format!("registry request bodies are limited to {MAX_REGISTRY_BODY} bytes"),
    )
}

/// Path segments are matched decoded, so an id such as `host%3A8081` works.
fn decode_segment(segment: &str) -> Result<String, GatewayError> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| GatewayError::new(ErrorCode::InvalidPath, "path segments must be UTF-8"))
}

fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            pair.split_once('=')
                .is_some_and(|(k, v)| k == name && matches!(v, "true" | "1"))
        })
    })
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    // Serializing these views cannot fail: they hold only strings, numbers
    // and string maps.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(body::full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn no_content() -> Response<Body> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// An instance as the API shows it (SPEC §3, §7): what was registered, its
/// health and circuit, and whether it takes new requests and why not. All
/// of it is read once per instance ([`balance::explain`]), so the fields
/// agree with each other.
#[derive(Serialize)]
struct InstanceView<'a> {
    id: &'a str,
    service: &'a str,
    url: &'a str,
    status: HealthStatus,
    last_ping: Option<String>,
    registered_at: String,
    metadata: &'a BTreeMap<String, String>,
    circuit: CircuitState,
    consecutive_failures: u32,
    state: InstanceState,
    routable: bool,
    /// `None` (JSON `null`) when routable, else one sentence.
    reason: Option<String>,
    last_check: Option<LastCheckView>,
}

/// `{"at", "ok", "status" | "error", "duration_ms"}`: `status` when an HTTP
/// answer came, `error` when none did; the other key is absent.
#[derive(Serialize)]
struct LastCheckView {
    at: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    duration_ms: u64,
}

impl LastCheckView {
    fn of(check: &LastCheck) -> Self {
        let (status, error) = match &check.result {
            CheckResult::Status(status) => (Some(*status), None),
            CheckResult::Error(error) => (None, Some(error.to_string())),
        };
        Self {
            at: rfc3339(check.at),
            ok: check.ok,
            status,
            error,
            duration_ms: u64::try_from(check.duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl<'a> InstanceView<'a> {
    fn of(instance: &'a Instance) -> Self {
        Self::at(instance, Instant::now(), SystemTime::now())
    }

    /// The view as of `now`, which is `wall` on the wall clock.
    fn at(instance: &'a Instance, now: Instant, wall: SystemTime) -> Self {
        let explained = balance::explain(instance, now);
        let reason = explained.reason(wall);
        let Explained {
            state,
            health,
            circuit,
            routability,
            ..
        } = explained;
        Self {
            id: instance.id(),
            service: instance.service(),
            url: instance.url().as_str(),
            status: health.status,
            last_ping: health.last_ping.map(rfc3339),
            registered_at: rfc3339(instance.registered_at()),
            metadata: instance.metadata(),
            circuit: circuit.state,
            consecutive_failures: circuit.consecutive_failures,
            state,
            routable: routability.is_ok(),
            reason,
            last_check: health.last_check.as_ref().map(LastCheckView::of),
        }
    }
}

/// A service as the API shows it; its status and its count of routable
/// instances are derived from the instance views it carries, so they
/// always agree.
#[derive(Serialize)]
struct ServiceView<'a> {
    name: &'a str,
    status: HealthStatus,
    routable_instances: usize,
    instances: Vec<InstanceView<'a>>,
}

impl<'a> ServiceView<'a> {
    fn of(entry: &'a ServiceEntry) -> Self {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let instances: Vec<_> = entry
            .instances()
            .iter()
            .map(|i| InstanceView::at(i, now, wall))
            .collect();
        let status = HealthStatus::of_service(instances.iter().map(|i| i.status));
        let routable_instances = instances.iter().filter(|i| i.routable).count();
        Self {
            name: entry.name(),
            status,
            routable_instances,
            instances,
        }
    }
}
