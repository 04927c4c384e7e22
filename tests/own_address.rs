//! The gateway's own address (SPEC §6) end to end, on a gateway listening
//! on a wildcard address: IPv4 addresses embedded in IPv6 are judged as the
//! IPv4 address they carry.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::Reply;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

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
        let gateway = Gateway::new(config).expect("gateway starts");
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
