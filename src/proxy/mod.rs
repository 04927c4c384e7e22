//! The proxy path: `ANY /call/<service>[/<rest>][?query]` (SPEC §5).
//!
//! One request goes through, in order:
//!
//! 1. [`path`]: the target is taken apart and refused if it could climb out
//!    of the instance's base path.
//! 2. The service's retry budget gets the request's deposit; the headers are
//!    rewritten once ([`headers`]); the body is read into the replay buffer
//!    if it is small enough ([`crate::retry::replay`]).
//! 3. The retry loop: pick a routable instance not tried yet
//!    ([`crate::balance`]), call it through its stack
//!    ([`crate::registry::InstanceStack`]: its circuit breaker over the
//!    attempt's time limit over its connection pools), classify what came
//!    back ([`crate::outcome`]), and on failure ask [`crate::retry::decide`]
//!    whether to try again after a full-jitter backoff. A circuit that
//!    refuses at the last moment costs no attempt; a client whose body
//!    fails gets its own error (408, 400), never blamed on the instance.
//! 4. The response streams back with its hop-by-hop headers removed and
//!    `x-switchyard-upstream` added; or, when nothing answered, the gateway's
//!    error ([`rescue`]). While the access log is on, every answer carries
//!    what the proxy did for it ([`Served`]).

pub mod headers;
pub mod path;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, Request, Response, Uri, Version, header};
use http_body_util::BodyExt;
use rand::Rng;
use rand::rngs::SmallRng;
use tokio::time::Instant;

use crate::balance;
use crate::body::{Body, BoxError};
use crate::breaker::CircuitState;
use crate::config::Config;
use crate::error::{ErrorCode, GatewayError};
use crate::gateway::Gateway;
use crate::metrics::{AttemptOutcome, ServiceStats};
use crate::outcome::{ClientFault, Failure, Outcome};
use crate::registry::{HealthStatus, Instance, InstanceStack, Registry, ServiceEntry};
use crate::retry::replay::RequestBody;
use crate::retry::{self, GiveUp, RequestTraits};
use crate::upstream::{Deadline, Outbound, UpstreamBody};
use headers::Peer;
use path::CallTarget;

/// Where the proxy's randomness comes from: the thread's generator in
/// production, a seeded one when a test needs the picks repeatable.
enum RngSource {
    Thread,
    Seeded(Mutex<SmallRng>),
}

impl RngSource {
    fn with<T>(&self, f: impl FnOnce(&mut dyn Rng) -> T) -> T {
        match self {
            Self::Thread => f(&mut rand::rng()),
            Self::Seeded(rng) => f(&mut *rng.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

/// What the proxy did for a request: the instance its last attempt went
/// to (`None` when no attempt went out) and how many attempts went out.
///
/// A response extension on every answer of the proxy, its own errors
/// included, for the access log ([`crate::access_log`]); set only while
/// the access log is on, since an extension costs allocations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    pub instance: Option<Arc<str>>,
    pub attempts: u32,
}

/// One request's [`Served`] as it goes, and whether its answer is to
/// carry it: read once, so a request and its answer agree.
struct Tally {
    served: Served,
    log: bool,
    started: Instant,
    /// The service's counters, once the service is known.
    stats: Option<Arc<ServiceStats>>,
}

impl Tally {
    fn new(gateway: &Gateway) -> Self {
        Self {
            served: Served::default(),
            log: gateway.access_switch().is_on(),
            started: Instant::now(),
            stats: None,
        }
    }

    fn attempts(&self) -> u32 {
        self.served.attempts
    }

    /// Counts an attempt at `instance` (one after the first is a retry);
    /// it is named only for the log.
    fn attempted(&mut self, instance: &Instance) {
        self.served.attempts += 1;
        if self.served.attempts > 1
            && let Some(stats) = &self.stats
        {
            stats.retried();
        }
        if self.log {
            self.served.instance = Some(instance.id_name().clone());
        }
    }

    /// The answer to the client: `result`, the gateway's error as its
    /// response, marked with what was served if the log is on.
    fn answer(self, result: Result<Response<Body>, GatewayError>) -> Response<Body> {
        let mut response = result.unwrap_or_else(GatewayError::into_response);
        if let Some(stats) = &self.stats {
            let now = Instant::now();
            stats.record(response.status().as_u16(), now - self.started, now);
        }
        if self.log {
            response.extensions_mut().insert(self.served);
        }
        response
    }
}

pub struct Proxy {
    settings: ArcSwap<Settings>,
    rng: RngSource,
}

/// What the proxy takes from the configuration, swapped whole by a reload;
/// a request reads it once, when it starts.
struct Settings {
    /// The gateway's name: its `Via` entry, and how it recognises a loop.
    name: String,
    via: HeaderValue,
    request_timeout: Duration,
}

impl Settings {
    fn of(config: &Config) -> Self {
        let name = config.gateway.name.clone();
        // Names are validated to header-safe characters.
        let via = HeaderValue::try_from(format!("1.1 {name}"))
            .unwrap_or(HeaderValue::from_static("1.1 switchyard"));
        Self {
            name,
            via,
            request_timeout: config.proxy.request_timeout,
        }
    }
}

impl Proxy {
    pub fn new(config: &Config, seed: Option<u64>) -> Self {
        use rand::SeedableRng;
        Self {
            settings: ArcSwap::from_pointee(Settings::of(config)),
            rng: match seed {
                Some(seed) => RngSource::Seeded(Mutex::new(SmallRng::seed_from_u64(seed))),
                None => RngSource::Thread,
            },
        }
    }

    /// Takes the name and request timeout of a reloaded `config`, for the
    /// requests that start from now on. A request already on its way keeps
    /// what it started with; one looping back under the old name is caught
    /// one round later, under the new.
    pub fn reconfigure(&self, config: &Config) {
        self.settings.store(Arc::new(Settings::of(config)));
    }

    /// Forwards one `/call/...` request of `gateway` from the client
    /// `peer`: the instance's response, or the gateway's error answer
    /// ([`GatewayError::into_response`]) when it has none to give.
    ///
    /// It owns what it uses, in one future: the router boxes it for every
    /// request, and a future that held its caller's arguments as well as
    /// its own would be copied into the box twice as large. So every way
    /// out goes through the request's tally, rather than a wrapper.
    pub async fn forward<B>(
        gateway: Arc<Gateway>,
        request: Request<B>,
        peer: Peer,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (proxy, registry) = (gateway.proxy(), gateway.registry());
        let mut tally = Tally::new(&gateway);
        let settings = proxy.settings.load();
        let request_timeout = settings.request_timeout;
        let (parts, body) = request.into_parts();
        let http::request::Parts {
            method,
            uri,
            headers: request_headers,
            version,
            ..
        } = parts;
        let (target, service) =
            match Proxy::admit(&settings.name, version, &uri, &request_headers, registry) {
                Ok(admitted) => admitted,
                Err(refused) => return tally.answer(Err(refused)),
            };
        tally.stats = Some(service.stats().clone());
        service.budget().deposit();
        let policy = &service.policy().retry;

        let client_host = request_headers.get(header::HOST).cloned().or_else(|| {
            uri.authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        // The body's size hint carries its Content-Length.
        let declared = http_body::Body::size_hint(&body).exact();
        let declare_empty = request_headers.contains_key(header::CONTENT_LENGTH);
        let fields =
            headers::forward_fields(&request_headers, &peer, client_host.as_ref(), &settings.via);
        drop((client_host, settings));
        let body = match RequestBody::read(body, declared, policy.max_replay_body_bytes).await {
            Ok(body) => body,
            Err(e) => return tally.answer(Err(ClientFault::of(&*e).into_error())),
        };

        let deadline = Instant::now() + request_timeout;
        let per_try = policy.effective_per_try_timeout(request_timeout);
        let mut tried: Vec<Arc<Instance>> = Vec::new();
        let mut refused: Vec<Arc<Instance>> = Vec::new();
        // Boxed: rare, and it would otherwise make every request's future
        // larger.
        let mut last_response: Option<Box<(Response<UpstreamBody>, Arc<Instance>)>> = None;
        let mut last_failure = Failure::Connect;

        loop {
            let now = Instant::now();
            let Some(instance) = proxy.choose(&service, now, &tried, &refused) else {
                if tally.attempts() == 0 {
                    return tally.answer(Err(unavailable(&service, now)));
                }
                break;
            };
            let Some((attempt_body, upload)) = body.for_attempt() else {
                break;
            };
            let attempt_deadline = match upload {
                None => Deadline::At((now + per_try).min(deadline)),
                Some(upload) => Deadline::AfterUpload {
                    timeout: request_timeout,
                    upload,
                },
            };
            let mut request = Outbound::with_deadline(
                method.clone(),
                &instance.url().target(target.rest, target.query),
                instance.url().host_header(),
                &fields,
                attempt_body,
                attempt_deadline,
            );
            request.declare_empty |= declare_empty;
            let result = call(instance.stack().clone(), request).await;
            let outcome = Outcome::of(&result);
            if let Some(counted) = AttemptOutcome::of(outcome) {
                instance.attempts().count(counted);
            }
            let failure = match (outcome, result) {
                (_, Ok(response)) => {
                    tally.attempted(&instance);
                    let status = response.status().as_u16();
                    let failure = if policy.retry_on_status.contains(&status) {
                        Failure::Status(status)
                    } else if response.status().is_server_error()
                        && instance.breaker().snapshot().0 == CircuitState::Open
                    {
                        Failure::Tripped(status)
                    } else {
                        return tally.answer(Ok(finish(response, &instance)));
                    };
                    last_response = Some(Box::new((response, instance.clone())));
                    failure
                }
                (Outcome::ClientFault(fault), Err(error)) => {
                    // The client's own body failed: its fault, not the instance's.
                    tracing::debug!(service = service.name(), error = %error, "request body failed");
                    return tally.answer(Err(fault.into_error()));
                }
                (Outcome::Refused, Err(_)) => {
                    refused.push(instance);
                    continue;
                }
                (outcome, Err(error)) => {
                    tally.attempted(&instance);
                    tracing::debug!(
                        service = service.name(),
                        instance = instance.id(),
                        attempt = tally.attempts(),
                        error = %error,
                        "attempt failed"
                    );
                    last_failure = match outcome {
                        Outcome::Failed(failure) => failure,
                        _ => Failure::Broken,
                    };
                    last_failure
                }
            };
            if Instant::now() >= deadline {
                last_failure = Failure::Timeout;
                break;
            }
            let traits = RequestTraits::new(&method, &request_headers, body.replayable());
            if let Err(why) =
                retry::decide(failure, traits, tally.attempts(), policy, service.budget())
            {
                if why == GiveUp::BudgetSpent {
                    service.stats().budget_exhausted();
                }
                tracing::debug!(service = service.name(), ?why, "not retrying");
                break;
            }
            tried.push(instance);
            let pause = proxy
                .rng
                .with(|rng| retry::backoff(policy, tally.attempts(), rng));
            if Instant::now() + pause >= deadline {
                last_failure = Failure::Timeout;
                break;
            }
            tokio::time::sleep(pause).await;
        }

        // Attempts ran out: the last upstream answer as it is, if there was one.
        tally.answer(match last_response {
            Some(last) => {
                let (response, instance) = *last;
                Ok(finish(response, &instance))
            }
            None => Err(rescue(last_failure, &service, request_timeout)),
        })
    }

    /// The request's target and service, unless it is refused before any
    /// attempt: an absolute-form target (this is not a forward proxy), a
    /// request that already passed through this gateway, a path that is
    /// not a call, or an unknown service.
    fn admit<'u>(
        name: &str,
        version: Version,
        uri: &'u Uri,
        headers: &HeaderMap,
        registry: &Registry,
    ) -> Result<(CallTarget<'u>, Arc<ServiceEntry>), GatewayError> {
        Self::check(version, uri, headers, name)?;
        let target = CallTarget::parse(uri)?;
        let service = registry
            .get(target.service)
            .ok_or_else(|| no_instance(target.service))?;
        Ok((target, service))
    }

    fn check(
        version: Version,
        uri: &Uri,
        headers: &HeaderMap,
        name: &str,
    ) -> Result<(), GatewayError> {
        if version < Version::HTTP_2 && uri.scheme().is_some() {
            // An absolute-form target asks for a forward proxy, which this is not.
            return Err(GatewayError::new(
                ErrorCode::InvalidPath,
                "absolute-form request targets are not accepted; send /call/<service>/<path>",
            ));
        }
        if headers::passed_through(headers, name) {
            return Err(GatewayError::new(
                ErrorCode::LoopDetected,
                format!("the request already passed through gateway {name:?}"),
            ));
        }
        Ok(())
    }

    /// A routable instance, preferring ones not tried yet for this request;
    /// instances whose circuit refused are never offered again.
    fn choose(
        &self,
        service: &ServiceEntry,
        now: Instant,
        tried: &[Arc<Instance>],
        refused: &[Arc<Instance>],
    ) -> Option<Arc<Instance>> {
        let among =
            |list: &[Arc<Instance>], i: &Instance| list.iter().any(|x| std::ptr::eq(&**x, i));
        self.rng.with(|rng| {
            let instances = service.instances();
            balance::pick(
                instances,
                now,
                |i| among(refused, i) || among(tried, i),
                rng,
            )
            .or_else(|| {
                if tried.is_empty() {
                    None
                } else {
                    balance::pick(instances, now, |i| among(refused, i), rng)
                }
            })
            .cloned()
        })
    }
}

/// Sends one attempt through `stack`. Written out with its concrete types:
/// the generic `ServiceExt::oneshot` trips the compiler's `Send` inference
/// over the boxed error's lifetime.
async fn call(
    mut stack: InstanceStack,
    request: Outbound,
) -> Result<Response<UpstreamBody>, BoxError> {
    std::future::poll_fn(|cx| tower::Service::poll_ready(&mut stack, cx)).await?;
    tower::Service::call(&mut stack, request).await
}

/// The upstream's response for the client (its connection fields already
/// consumed by the upstream connection) with `x-switchyard-upstream`
/// added, the body streamed through untouched.
fn finish(response: Response<UpstreamBody>, instance: &Instance) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(
        headers::X_SWITCHYARD_UPSTREAM.clone(),
        instance.id_header().clone(),
    );
    Response::from_parts(parts, body.boxed_unsync())
}

fn no_instance(service: &str) -> GatewayError {
    GatewayError::new(
        ErrorCode::NoHealthyInstance,
        format!("no instance of service {service:?} is registered"),
    )
}

/// Why no instance could take the request: every circuit of the instances
/// health checks allow is open (503 `circuit_open`, with `Retry-After` until
/// the first goes half-open), or none is healthy (503 `no_healthy_instance`).
fn unavailable(service: &ServiceEntry, now: Instant) -> GatewayError {
    let waits: Vec<Duration> = service
        .instances()
        .iter()
        .filter(|i| i.status() != HealthStatus::Unhealthy)
        .map(|i| {
            i.breaker()
                .retry_after(now)
                .unwrap_or(Duration::from_secs(1))
        })
        .collect();
    match waits.iter().min() {
        Some(wait) => {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            GatewayError::new(
                ErrorCode::CircuitOpen,
                format!(
                    "every instance of service {:?} has its circuit open",
                    service.name()
                ),
            )
            .with_retry_after(secs.max(1))
        }
        None => GatewayError::new(
            ErrorCode::NoHealthyInstance,
            format!("no instance of service {:?} is healthy", service.name()),
        ),
    }
}

/// The gateway's answer when attempts ran out without any upstream response.
fn rescue(failure: Failure, service: &ServiceEntry, timeout: Duration) -> GatewayError {
    let name = service.name();
    match failure {
        Failure::Connect => GatewayError::new(
            ErrorCode::UpstreamUnreachable,
            format!("could not connect to an instance of service {name:?}"),
        ),
        Failure::Forbidden => GatewayError::new(
            ErrorCode::UpstreamForbidden,
            format!(
                "the instances of service {name:?} resolve to addresses outside the upstream policy"
            ),
        ),
        Failure::Timeout => GatewayError::new(
            ErrorCode::UpstreamTimeout,
            format!(
                "service {name:?} did not answer within the time allowed (request_timeout {})",
                crate::config::fmt_duration(timeout)
            ),
        ),
        Failure::Broken | Failure::Status(_) | Failure::Tripped(_) => GatewayError::new(
            ErrorCode::UpstreamError,
            format!("an instance of service {name:?} sent a broken response"),
        ),
    }
}
