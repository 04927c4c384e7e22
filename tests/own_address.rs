//! The gateway's own address (SPEC §6) end to end: listening on a wildcard
//! address, every address of the machine with the listen port is the
//! gateway's own and is refused, and IPv4 addresses embedded in IPv6 are
//! judged as the IPv4 address they carry.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::Reply;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use switchyard::upstream::connect::{ConnectError, connect};
use switchyard::upstream::policy::{Refusal, UpstreamPolicy};
use switchyard::{Config, Gateway, server};

/// The real gateway listening on a wildcard address (`0.0.0.0:0` or
/// `[::]:0`), told where it really listens, reached by the test over
/// loopback.
struct WildcardGateway {
    listen: SocketAddr,
    /// Where the test's client connects: loopback of the same family.
    reach: SocketAddr,
    gateway: Arc<Gateway>,
    client: common::TestClient,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl WildcardGateway {
    async fn start(wildcard: &str) -> std::io::Result<Self> {
        let mut config =
            Config::from_toml("[health_check]\ninterval = \"0s\"\n").expect("test config is valid");
        let listener = TcpListener::bind(wildcard).await?;
        let listen = listener.local_addr()?;
        assert!(listen.ip().is_unspecified(), "{listen} is a wildcard");
        config.gateway.listen = listen;
        let loopback: IpAddr = if listen.is_ipv4() {
            "127.0.0.1".parse().unwrap()
        } else {
            "::1".parse().unwrap()
        };
        let gateway = Gateway::new(config).await.expect("gateway starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, gateway.clone(), async {
            let _ = stopped.await;
        }));
        Ok(Self {
            listen,
            reach: SocketAddr::new(loopback, listen.port()),
            gateway,
            client: common::client(),
            stop: Some(stop),
            task,
        })
    }

    fn port(&self) -> u16 {
        self.listen.port()
    }

    async fn register(&self, url: &str) -> Reply {
        let body = json!({"name": "svc", "url": url}).to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/services", self.reach))
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .unwrap();
        common::send(&self.client, request).await
    }

    async fn services(&self) -> serde_json::Value {
        let request = Request::builder()
            .uri(format!("http://{}/services", self.reach))
            .body(Full::default())
            .unwrap();
        common::send(&self.client, request).await.json()
    }

    async fn assert_forbidden(&self, url: &str) {
        let reply = self.register(url).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{url}: {}",
            reply.text()
        );
        // `error_code` checks the SPEC error shape: the JSON body
        // `{"error":{"code","message"}}` and the `x-switchyard-error` header.
        assert_eq!(reply.error_code(), "upstream_forbidden", "{url}");
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap();
    }
}

impl Drop for WildcardGateway {
    fn drop(&mut self) {
        self.gateway.stop_background();
        self.task.abort();
    }
}

/// A non-loopback, non-link-local address of this machine in the family
/// `v4` says, if it has one.
fn machine_address(v4: bool) -> Option<IpAddr> {
    if_addrs::get_if_addrs()
        .expect("the machine's addresses")
        .into_iter()
        .map(|interface| interface.ip())
        .find(|ip| {
            ip.is_ipv4() == v4
                && !ip.is_loopback()
                && !ip.is_unspecified()
                && match ip {
                    IpAddr::V4(v4) => !v4.is_link_local(),
                    IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                }
        })
}

/// The policy the gateway builds for `listen`, as the connect path uses it.
fn policy_for(listen: SocketAddr) -> UpstreamPolicy {
    UpstreamPolicy::new(&Config::default().upstreams, listen)
}

#[tokio::test]
async fn listening_on_0_0_0_0_the_machines_own_addresses_are_refused() {
    let Some(machine) = machine_address(true) else {
        eprintln!("note: this machine has no non-loopback IPv4 address; nothing to check");
        return;
    };
    let gw = WildcardGateway::start("0.0.0.0:0").await.unwrap();
    let port = gw.port();
    let own = SocketAddr::new(machine, port);

    // At registration: the machine's address with the listen port would
    // reach the gateway's own registry API.
    gw.assert_forbidden(&format!("http://{own}/services")).await;
    gw.assert_forbidden(&format!("http://{own}")).await;
    gw.assert_forbidden(&format!("http://127.0.0.1:{port}"))
        .await;
    gw.assert_forbidden(&format!("http://[::ffff:{machine}]:{port}"))
        .await;
    // On another port the same address is someone else's.
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_port = other.local_addr().unwrap().port();
    assert_ne!(other_port, port);
    let reply = gw.register(&format!("http://{machine}:{other_port}")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());

    // At connect time (what a hostname resolving to the address meets):
    // nothing is connected to.
    match connect(
        &machine.to_string(),
        port,
        Duration::from_secs(5),
        &policy_for(gw.listen),
    )
    .await
    {
        Err(ConnectError::Forbidden { addr, why }) => {
            assert_eq!(addr, own);
            assert_eq!(why, Refusal::OwnAddress);
        }
        other => panic!("connect to {own} was not refused: {other:?}"),
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn listening_on_ipv6_wildcard_the_machines_own_addresses_are_refused() {
    let Some(machine) = machine_address(false) else {
        eprintln!("note: this machine has no global IPv6 address; nothing to check");
        return;
    };
    let gw = match WildcardGateway::start("[::]:0").await {
        Ok(gw) => gw,
        Err(e) => {
            eprintln!("note: cannot listen on [::]:0 ({e}); nothing to check");
            return;
        }
    };
    let port = gw.port();
    let own = SocketAddr::new(machine, port);
    gw.assert_forbidden(&format!("http://{own}/services")).await;
    gw.assert_forbidden(&format!("http://[::1]:{port}")).await;
    if let Some(v4) = machine_address(true) {
        // `::` takes IPv4 connections as well (unless IPV6_V6ONLY).
        gw.assert_forbidden(&format!("http://{v4}:{port}")).await;
    }
    match connect(
        &format!("[{machine}]"),
        port,
        Duration::from_secs(5),
        &policy_for(gw.listen),
    )
    .await
    {
        Err(ConnectError::Forbidden { why, .. }) => assert_eq!(why, Refusal::OwnAddress),
        other => panic!("connect to {own} was not refused: {other:?}"),
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn ipv4_embedded_in_ipv6_is_judged_as_ipv4() {
    let gw = WildcardGateway::start("0.0.0.0:0").await.unwrap();
    for url in [
        // IPv4-compatible (::/96) and NAT64 (64:ff9b::/96) spellings of
        // 169.254.169.254, in the default deny list.
        "http://[::169.254.169.254]/",
        "http://[::a9fe:a9fe]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[64:ff9b::169.254.169.254]:8080/",
        "http://[::ffff:169.254.169.254]/",
    ] {
        gw.assert_forbidden(url).await;
    }
    assert_eq!(gw.services().await, json!([]), "nothing registered");

    // ::1 keeps its IPv6 meaning (loopback, allowed) although it lies in
    // ::/96; on the listen port it is the gateway itself.
    gw.assert_forbidden(&format!("http://[::1]:{}", gw.port()))
        .await;
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_port = other.local_addr().unwrap().port();
    let reply = gw.register(&format!("http://[::1]:{other_port}")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    gw.shutdown().await;
}
