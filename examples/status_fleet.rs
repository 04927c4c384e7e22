//! A gateway with a small, realistic fleet behind it, for looking at the
//! status page (`docs/status-screenshot.sh` photographs it):
//!
//! - `billing`: three instances, one draining for a deploy;
//! - `checkout`: four, one failing its health checks, one answering 503 to
//!   traffic until its circuit opens;
//! - `search`: 48 (so the page starts it collapsed), three of them gone;
//! - `users`: five, in two zones.
//!
//! Every instance is a real HTTP server on 127.0.0.1; the gateway checks
//! them every two seconds and the circuit is opened by real requests. Once
//! the fleet has settled it prints `ready http://<addr>/status` and serves
//! until interrupted.
//!
//! ```text
//! cargo run --example status_fleet [-- 127.0.0.1:8080]
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard::registry::{Registration, Write};
use switchyard::{Config, Gateway, server};
use tokio::net::TcpListener;

/// How an instance's server behaves.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Fine,
    /// `/health` answers 503; traffic is served.
    FailsChecks,
    /// `/health` passes; traffic gets 503.
    FailsTraffic,
    /// Nothing listens.
    Gone,
}

struct Planned {
    service: &'static str,
    id: String,
    behaviour: Behaviour,
    draining: bool,
    metadata: BTreeMap<String, String>,
}

fn plan() -> Vec<Planned> {
    let mut fleet = Vec::new();
    let mut add = |service, id: String, behaviour, draining, zone: &str, version: &str| {
        let metadata = [("zone", zone), ("version", version)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        fleet.push(Planned {
            service,
            id,
            behaviour,
            draining,
            metadata,
        });
    };
    for (n, draining) in [(1, false), (2, false), (3, true)] {
        let version = if draining { "4.2.0" } else { "4.1.3" };
        add(
            "billing",
            format!("billing-{n}"),
            Behaviour::Fine,
            draining,
            "eu-west-1a",
            version,
        );
    }
    for (n, behaviour) in [
        (1, Behaviour::Fine),
        (2, Behaviour::Fine),
        (3, Behaviour::FailsChecks),
        (4, Behaviour::FailsTraffic),
    ] {
        add(
            "checkout",
            format!("checkout-{n}"),
            behaviour,
            false,
            "eu-west-1b",
            "2.8.0",
        );
    }
    for n in 0..48 {
        let behaviour = if [7, 19, 33].contains(&n) {
            Behaviour::Gone
        } else {
            Behaviour::Fine
        };
        let zone = ["eu-west-1a", "eu-west-1b", "eu-west-1c"][n % 3];
        add(
            "search",
            format!("search-{n:02}"),
            behaviour,
            n == 40,
            zone,
            "7.0.1",
        );
    }
    for n in 1..=5 {
        let zone = if n % 2 == 0 {
            "eu-west-1b"
        } else {
            "eu-west-1a"
        };
        add(
            "users",
            format!("users-{n}"),
            Behaviour::Fine,
            false,
            zone,
            "1.14.2",
        );
    }
    fleet
}

/// Starts the instance's server; its URL.
async fn start(behaviour: Behaviour) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    if behaviour == Behaviour::Gone {
        return format!("http://{addr}");
    }
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let health = request.uri().path() == "/health";
                let status = match (behaviour, health) {
                    (Behaviour::FailsChecks, true) | (Behaviour::FailsTraffic, false) => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => StatusCode::OK,
                };
                let mut response = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                *response.status_mut() = status;
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    format!("http://{addr}")
}

#[tokio::main]
async fn main() {
    let listen: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .expect("the argument is an address such as 127.0.0.1:8080");
    let listener = TcpListener::bind(listen).await.expect("bind the gateway");
    let addr = listener.local_addr().expect("bound");
    let mut config = Config::from_toml(
        r#"
        [gateway]
        name = "edge-eu-west-1"
        [health_check]
        interval = "2s"
        timeout = "1s"
        unhealthy_threshold = 1
        [circuit_breaker]
        reset_timeout = "10m"
        "#,
    )
    .expect("the example's configuration is valid");
    config.gateway.listen = addr;
    let gateway = Gateway::new(config).await.expect("the gateway starts");
    tokio::spawn(server::run(
        listener,
        gateway.clone(),
        std::future::pending(),
    ));

    let registry = gateway.registry();
    for planned in plan() {
        let url = start(planned.behaviour).await;
        let registration = Registration {
            name: planned.service.into(),
            url,
            id: Some(planned.id.clone()),
            metadata: planned.metadata,
            ttl: None,
        };
        registry
            .write(Write::Register(registration))
            .await
            .expect("registered");
        if planned.draining {
            let (service, id) = (planned.service.into(), planned.id);
            let drain = Write::SetState {
                service,
                id,
                draining: true,
            };
            registry.write(drain).await.expect("drained");
        }
    }

    // Traffic to checkout until checkout-4's circuit opens.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let uri: http::Uri = format!("http://{addr}/call/checkout/cart")
        .parse()
        .expect("a valid URI");
    let tripped = || {
        registry.get("checkout").is_some_and(|entry| {
            entry.instance("checkout-4").is_ok_and(|i| {
                i.breaker().snapshot_at(tokio::time::Instant::now()).state
                    == switchyard::breaker::CircuitState::Open
            })
        })
    };
    while !tripped() {
        client.get(uri.clone()).await.expect("the gateway answers");
    }
    // Some traffic everywhere, for the last minute's figures.
    let names: Vec<String> = registry
        .services()
        .iter()
        .map(|entry| entry.name().to_string())
        .collect();
    for name in &names {
        let uri: http::Uri = format!("http://{addr}/call/{name}/")
            .parse()
            .expect("a valid URI");
        for _ in 0..200 {
            client.get(uri.clone()).await.expect("the gateway answers");
        }
    }
    // Every instance checked at least once.
    while registry.services().iter().any(|entry| {
        entry
            .instances()
            .iter()
            .any(|i| i.health().last_check().is_none())
    }) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("ready http://{addr}/status");
    tokio::signal::ctrl_c().await.expect("wait for ^C");
}
