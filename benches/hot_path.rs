//! Micro-benchmarks of what every proxied request does besides I/O: find
//! the service, pick an instance, pass its circuit, decide on a retry, and
//! rewrite headers. Each should cost the same whatever the size of the
//! registry: compare the 10 / 10 000 services and 3 / 1 000 instances rows.
//! The last rows take one `/call` through the whole gateway stack, answered
//! by the proxy without an instance to call: what the gateway-wide layers
//! cost around it, with the access log off and on.

use std::hint::black_box;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request, Uri};
use http_body_util::BodyExt;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use switchyard::access_log::AccessSwitch;
use switchyard::balance;
use switchyard::breaker::Breaker;
use switchyard::config::{CircuitBreakerConfig, Config, LogConfig, LogFormat, RetryConfig};
use switchyard::log::Logging;
use switchyard::proxy::headers::{self, Peer};
use switchyard::proxy::path::CallTarget;
use switchyard::registry::{HealthChecker, Registration, Registry};
use switchyard::retry::{self, Failure, RequestTraits, RetryBudget};
use tokio::time::Instant;
use tower::Service;

/// A registry of `services` services with `instances` instances each,
/// health checks off.
fn registry(services: usize, instances: usize) -> Registry {
    let config = Config::from_toml(
        "[health_check]\ninterval = \"0s\"\n[limits]\nmax_instances = 1000000\nmax_instances_per_service = 1000",
    )
    .expect("valid");
    let checker = HealthChecker::new(tokio_util::sync::CancellationToken::new());
    let registry = Registry::new(Arc::new(config), checker);
    for s in 0..services {
        for i in 0..instances {
            registry
                .register(Registration {
                    name: format!("service-{s}"),
                    url: format!("http://10.{}.{}.{}:{}", s % 250, i / 250, i % 250, 8000 + i),
                    ..Registration::default()
                })
                .expect("registered");
        }
    }
    registry
}

fn route_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route lookup");
    for services in [10, 10_000] {
        let registry = registry(services, 1);
        let name = format!("service-{}", services / 2);
        group.bench_function(format!("{services} services"), |b| {
            b.iter(|| black_box(registry.get(black_box(&name))))
        });
    }
    group.finish();
}

fn instance_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("instance pick");
    for instances in [3, 1_000] {
        let registry = registry(1, instances);
        let service = registry.get("service-0").expect("registered");
        let mut rng = SmallRng::seed_from_u64(1);
        group.bench_function(format!("{instances} instances"), |b| {
            b.iter(|| {
                let now = Instant::now();
                black_box(balance::pick(service.instances(), now, |_| false, &mut rng))
            })
        });
    }
    group.finish();
}

fn breaker(c: &mut Criterion) {
    let breaker = Arc::new(Breaker::new(
        &CircuitBreakerConfig::default(),
        "svc".into(),
        "i-1".into(),
    ));
    c.bench_function("breaker admit + record success", |b| {
        b.iter(|| {
            let permit = breaker.try_admit().expect("closed");
            permit.success();
        })
    });
}

fn retry_decision(c: &mut Criterion) {
    let config = RetryConfig::default();
    let budget = RetryBudget::new(0.2, 10);
    let traits = RequestTraits {
        idempotent: true,
        replayable: true,
    };
    c.bench_function("retry decision (status not retried)", |b| {
        b.iter(|| {
            black_box(retry::decide(
                Failure::Status(500),
                traits,
                1,
                &config,
                &budget,
            ))
        })
    });
    c.bench_function("retry budget deposit", |b| b.iter(|| budget.deposit()));
}

fn header_rewriting(c: &mut Criterion) {
    let mut request = HeaderMap::new();
    for (name, value) in [
        ("host", "gateway.local:8080"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("content-type", "application/json"),
        ("x-request-id", "c1b5c8b2-4a51-4c8e-9d1b-2b1f8c7d9e01"),
    ] {
        request.insert(name, HeaderValue::from_static(value));
    }
    let response: &[u8] =
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\n\
        Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n";
    let peer = Peer::new("127.0.0.1:40000".parse().expect("address"));
    let host = HeaderValue::from_static("gateway.local:8080");
    let via = HeaderValue::from_static("1.1 registry");
    c.bench_function("request header rewriting", |b| {
        b.iter(|| headers::forward_fields(&request, &peer, Some(&host), &via))
    });
    c.bench_function("response header rewriting", |b| {
        b.iter_batched_ref(
            || BytesMut::from(response),
            |read| switchyard::http1::head::parse_response(read, false, 65536),
            BatchSize::SmallInput,
        )
    });
    let request_head: &[u8] = b"GET /call/user-service/users/42 HTTP/1.1\r\nHost: gateway.local:8080\r\n\
        User-Agent: curl/8.5.0\r\nAccept: */*\r\nX-Request-Id: c1b5c8b2-4a51-4c8e-9d1b-2b1f8c7d9e01\r\n\r\n";
    c.bench_function("request head parsing", |b| {
        b.iter_batched_ref(
            || BytesMut::from(request_head),
            |read| switchyard::http1::head::parse_request(read, 65536),
            BatchSize::SmallInput,
        )
    });
    let uri: Uri = "/call/user-service/users/42/orders?page=2&sort=desc"
        .parse()
        .expect("uri");
    c.bench_function("call target parse", |b| {
        b.iter(|| black_box(CallTarget::parse(black_box(&uri))))
    });
}

/// One `/call` to a service with no instance through the gateway's stack,
/// answered 503 by the proxy, its body read to the end: with the access
/// log off, then on, in JSON, its lines written to nowhere by the logging
/// thread. (That installs the process's subscriber: it runs last.)
fn gateway_stack(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    stack_call(c, &runtime, "stack: /call answered by the gateway", None);
    let on = LogConfig {
        access: true,
        format: LogFormat::Json,
    };
    let logging = Logging::init_writing_to(&on, std::io::sink()).expect("the first subscriber");
    stack_call(
        c,
        &runtime,
        "stack: /call answered by the gateway, access log on",
        Some(logging.access_switch().clone()),
    );
}

fn stack_call(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    access: Option<AccessSwitch>,
) {
    let config = Config::from_toml("[health_check]\ninterval = \"0s\"\n").expect("valid");
    let gateway = match access {
        Some(access) => runtime.block_on(switchyard::Gateway::with_access_switch(config, access)),
        None => runtime.block_on(switchyard::Gateway::new(config)),
    }
    .expect("gateway");
    let stack = switchyard::stack::stack(gateway);
    c.bench_function(name, |b| {
        b.to_async(runtime).iter_batched(
            || {
                let request = Request::get("/call/absent/users/42")
                    .header("x-request-id", "c1b5c8b2-4a51-4c8e-9d1b-2b1f8c7d9e01")
                    .body(switchyard::body::empty())
                    .expect("request");
                (stack.clone(), request)
            },
            |(mut stack, request)| async move {
                let response = stack.call(request).await.expect("infallible");
                black_box(response.into_body().collect().await.expect("full body"))
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(
    benches,
    route_lookup,
    instance_pick,
    breaker,
    retry_decision,
    header_rewriting,
    gateway_stack
);
criterion_main!(benches);
