//! The etcd store (SPEC §8) against a real etcd (Debian's `etcd-server`,
//! `/usr/bin/etcd`) started by each test on free ports with its own data
//! directory. Built only with `--features etcd`.

#![cfg(feature = "etcd")]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{Running, TempDir, gateway, listed};
use http::{Method, StatusCode};
use serde_json::json;

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member, killed when dropped.
struct Etcd {
    child: Child,
    client_url: String,
    peer_url: String,
    data: std::path::PathBuf,
}

impl Etcd {
    fn start(dir: &TempDir) -> Self {
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data = dir.path("etcd");
        let child = Self::spawn(&client_url, &peer_url, &data);
        let etcd = Self {
            child,
            client_url,
            peer_url,
            data,
        };
        etcd.wait_ready();
        etcd
    }

    /// Starts it again, killed, on the same ports and data.
    fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.client_url, &self.peer_url, &self.data);
        self.wait_ready();
    }

    fn spawn(client_url: &str, peer_url: &str, data: &std::path::Path) -> Child {
        Command::new("etcd")
            .args(["--name", "default", "--data-dir"])
            .arg(data)
            .args(["--listen-client-urls", client_url])
            .args(["--advertise-client-urls", client_url])
            .args(["--listen-peer-urls", peer_url])
            .args(["--initial-advertise-peer-urls", peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (Debian: apt-get install etcd-server)")
    }

    /// Waits for `/health` to answer `"health":"true"`.
    fn wait_ready(&self) {
        use std::io::{Read, Write};
        let addr = self.client_url.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(&addr) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                if answer.contains("\"health\":\"true\"") {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn config(&self, prefix: &str) -> String {
        format!(
            "[registry]\nstore = \"etcd\"\nendpoints = [\"{}\"]\nprefix = \"{prefix}\"\n\
             connect_timeout = \"2s\"\n",
            self.client_url
        )
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn register(gw: &Running, name: &str, url: &str) -> (StatusCode, serde_json::Value) {
    gw.send(
        Method::POST,
        "/services",
        Some(json!({"name": name, "url": url, "metadata": {"zone": "b"}})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_later_loads_what_another_registered() {
    let dir = TempDir::new("etcd-load");
    let etcd = Etcd::start(&dir);
    dir.config(&etcd.config("/test-load/"));
    let a = Running::start(&dir);
    for port in 1..=3 {
        let (status, body) = register(&a, "api", &format!("http://10.0.0.{port}:80")).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, _) = a
        .send(Method::DELETE, "/services/api/instances/10.0.0.2:80", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let b = Running::start(&dir);
    let loaded = listed(&b).await;
    let mut ids: Vec<_> = loaded.keys().map(|(_, id)| id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["10.0.0.1:80", "10.0.0.3:80"]);
    for instance in loaded.values() {
        assert_eq!(instance["metadata"], json!({"zone": "b"}));
        assert_eq!(instance["status"], "unknown");
    }
}

/// Polls `gw`'s listing until `ready` holds of it.
async fn until_listed<F>(gw: &Running, what: &str, ready: F)
where
    F: Fn(&std::collections::HashMap<(String, String), serde_json::Value>) -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ready(&listed(gw).await) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn key(service: &str, id: &str) -> (String, String) {
    (service.to_string(), id.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_follow_each_others_writes() {
    let dir = TempDir::new("etcd-two");
    let etcd = Etcd::start(&dir);
    dir.config(&etcd.config("/test-two/"));
    let a = Running::start(&dir);
    let b = Running::start(&dir);

    let (status, _) = register(&a, "api", "http://10.0.0.1:80").await;
    assert_eq!(status, StatusCode::CREATED);
    until_listed(&b, "A's registration at B", |l| {
        l.contains_key(&key("api", "10.0.0.1:80"))
    })
    .await;
    let (status, _) = register(&b, "api", "http://10.0.0.2:80").await;
    assert_eq!(status, StatusCode::CREATED);
    until_listed(&a, "B's registration at A", |l| {
        l.contains_key(&key("api", "10.0.0.2:80"))
    })
    .await;

    // A drain at B is followed at A, and A no longer routes to it.
    let (status, _) = b
        .send(
            Method::PUT,
            "/services/api/instances/10.0.0.1:80/state",
            Some(json!({"state": "draining"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    until_listed(&a, "the drain at A", |l| {
        l.get(&key("api", "10.0.0.1:80"))
            .is_some_and(|i| i["state"] == "draining" && i["routable"] == false)
    })
    .await;

    // A removal at A is followed at B.
    let (status, _) = a
        .send(Method::DELETE, "/services/api/instances/10.0.0.2:80", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    until_listed(&b, "the removal at B", |l| {
        !l.contains_key(&key("api", "10.0.0.2:80"))
    })
    .await;
    // Each lists exactly the one left, once: its own writes did not come
    // back to it as extra changes.
    for gw in [&a, &b] {
        let ids: Vec<_> = listed(gw).await.into_keys().collect();
        assert_eq!(ids, [key("api", "10.0.0.1:80")]);
    }
}

/// A TTL instance lives on an etcd lease: heartbeats at the other gateway
/// keep it, and once they stop it expires everywhere, though the gateway
/// that took the registration was killed long before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_outlives_its_gateway_and_expires_at_the_other() {
    let dir = TempDir::new("etcd-lease");
    let etcd = Etcd::start(&dir);
    dir.config(&etcd.config("/test-lease"));
    let a = Running::start(&dir);
    let b = Running::start(&dir);
    let (status, body) = a
        .send(
            Method::POST,
            "/services",
            Some(json!({"name": "api", "url": "http://10.0.0.1:80", "ttl": "2s"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    until_listed(&b, "the TTL instance at B", |l| l.len() == 1).await;
    a.kill();

    // Heartbeats at B, for three TTLs: the instance stays.
    let beats_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < beats_until {
        let (status, body) = b
            .send(
                Method::PUT,
                "/services/api/instances/10.0.0.1:80/heartbeat",
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(listed(&b).await.len(), 1, "kept alive by B's heartbeats");
    // No more heartbeats: etcd expires the lease and B drops it.
    until_listed(&b, "the expiry at B", |l| l.is_empty()).await;
}

fn signal(gw: &Running, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// B misses changes that etcd then compacts away: when its watch comes
/// back it finds its revision gone, reloads everything and applies the
/// difference, removals included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_revision_was_compacted_reloads_everything() {
    let dir = TempDir::new("etcd-compact");
    let mut etcd = Etcd::start(&dir);
    // A static service: the gateway's own, kept through the reload.
    dir.config(&format!(
        "{}[[services]]\nname = \"local\"\nurls = [\"http://10.9.9.9:80\"]\n",
        etcd.config("/test-compact")
    ));
    let a = Running::start(&dir);
    let mut b = Running::start(&dir);
    for port in 1..=2 {
        let (status, _) = register(&a, "api", &format!("http://10.0.0.{port}:80")).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    until_listed(&b, "both at B", |l| l.len() == 3).await;

    // B loses etcd, and is frozen before it can watch again.
    etcd.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !degraded(&b).await.is_string() {
        assert!(Instant::now() < deadline, "B never saw etcd go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&b, "-STOP");
    etcd.restart();

    // Meanwhile at A: one removed, one added, and the history compacted.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = register(&a, "api", "http://10.0.0.3:80").await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(Instant::now() < deadline, "writes never resumed at A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = a
        .send(Method::DELETE, "/services/api/instances/10.0.0.1:80", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let mut etcd_client = etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .unwrap();
    let now = etcd_client.get("x", None).await.unwrap();
    let revision = now.header().unwrap().revision();
    etcd_client
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();

    signal(&b, "-CONT");
    until_listed(&b, "B caught up", |l| {
        let mut ids: Vec<_> = l.keys().map(|(_, id)| id.as_str()).collect();
        ids.sort();
        ids == ["10.0.0.2:80", "10.0.0.3:80", "10.9.9.9:80"]
    })
    .await;
    // Through the reload, not a plain resumption.
    b.wait_for("reloading everything");
    b.wait_for("caught up with the shared store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_registries_apart() {
    let dir = TempDir::new("etcd-prefix");
    let etcd = Etcd::start(&dir);
    dir.config(&etcd.config("/one/"));
    let one = Running::start(&dir);
    let (status, _) = register(&one, "api", "http://10.0.0.1:80").await;
    assert_eq!(status, StatusCode::CREATED);
    dir.config(&etcd.config("/two/"));
    let two = Running::start(&dir);
    assert!(listed(&two).await.is_empty());
}

async fn degraded(gw: &Running) -> serde_json::Value {
    let (status, body) = gw.send(Method::GET, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["degraded"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_etcd_restart_writes_resume_and_gateways_follow_again() {
    let dir = TempDir::new("etcd-restart");
    let mut etcd = Etcd::start(&dir);
    dir.config(&etcd.config("/switchyard"));
    let a = Running::start(&dir);
    let b = Running::start(&dir);
    let (status, _) = register(&a, "api", "http://10.0.0.1:80").await;
    assert_eq!(status, StatusCode::CREATED);
    until_listed(&b, "the first registration at B", |l| l.len() == 1).await;
    assert_eq!(degraded(&a).await, serde_json::Value::Null);

    etcd.kill();
    let (status, _) = register(&a, "api", "http://10.0.0.2:80").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(degraded(&a).await.is_string(), "a failed write marks it");
    // B learns it from its broken watch.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !degraded(&b).await.is_string() {
        assert!(Instant::now() < deadline, "B never saw etcd go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = register(&a, "api", "http://10.0.0.3:80").await;
        if status == StatusCode::CREATED {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "writes never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(degraded(&a).await, serde_json::Value::Null);
    // B's watch resumed from its revision: it routes by the new one, and
    // nothing acknowledged before the outage is lost or doubled.
    until_listed(&b, "the registration after the restart at B", |l| {
        l.contains_key(&key("api", "10.0.0.3:80"))
    })
    .await;
    for gw in [&a, &b] {
        let mut ids: Vec<_> = listed(gw).await.into_keys().map(|(_, id)| id).collect();
        ids.sort();
        assert_eq!(ids, ["10.0.0.1:80", "10.0.0.3:80"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_gone_writes_get_503_fast_and_proxying_goes_on() {
    let dir = TempDir::new("etcd-outage");
    let mut etcd = Etcd::start(&dir);
    dir.config(&etcd.config("/test-outage/"));
    let gw = Running::start(&dir);
    let (status, _) = register(&gw, "api", "http://10.0.0.1:80").await;
    assert_eq!(status, StatusCode::CREATED);
    let up = common::Upstream::start(|_| async { common::response(200, "up") }).await;
    let (status, _) = register(&gw, "web", &up.url()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(degraded(&gw).await, serde_json::Value::Null);
    etcd.kill();

    // Proxying goes on from the last state seen.
    for _ in 0..20 {
        let (status, _) = gw.send(Method::GET, "/call/web/", None).await;
        assert_eq!(status, StatusCode::OK);
    }

    let started = Instant::now();
    let (status, body) = register(&gw, "api", "http://10.0.0.2:80").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    // Bounded by connect_timeout (2 s), with room for a slow machine.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Nothing of the refused write was applied; what was there stays.
    let api: Vec<_> = listed(&gw)
        .await
        .into_keys()
        .filter(|(service, _)| service == "api")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(api, ["10.0.0.1:80"]);
    let (status, _) = gw.send(Method::GET, "/call/web/", None).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "still proxying after the refused write"
    );
    let degraded = degraded(&gw).await;
    assert!(
        degraded.as_str().is_some_and(|d| d.contains("etcd")),
        "{degraded}"
    );
}

/// `require_store_at_start = false`: started with etcd down, the gateway
/// serves its static services and refuses writes; once etcd is back it
/// loads what others registered and takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_at_start_it_can_serve_static_services_and_catch_up() {
    let dir = TempDir::new("etcd-later");
    let mut etcd = Etcd::start(&dir);
    dir.config(&format!(
        "{}require_store_at_start = false\n\
         [[services]]\nname = \"local\"\nurls = [\"http://10.9.9.9:80\"]\n",
        etcd.config("/test-later")
    ));
    let a = Running::start(&dir);
    let (status, _) = register(&a, "api", "http://10.0.0.1:80").await;
    assert_eq!(status, StatusCode::CREATED);
    drop(a);
    etcd.kill();

    let b = Running::start(&dir);
    let ids: Vec<_> = listed(&b).await.into_keys().map(|(_, id)| id).collect();
    assert_eq!(ids, ["10.9.9.9:80"], "the static service, nothing else yet");
    assert!(degraded(&b).await.is_string());
    let (status, body) = register(&b, "api", "http://10.0.0.2:80").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");

    etcd.restart();
    until_listed(&b, "what A registered, at B", |l| {
        l.contains_key(&key("api", "10.0.0.1:80")) && l.contains_key(&key("local", "10.9.9.9:80"))
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = register(&b, "api", "http://10.0.0.2:80").await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(Instant::now() < deadline, "B never took writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(degraded(&b).await, serde_json::Value::Null);
}

#[test]
fn an_unreachable_etcd_at_start_exits_1_naming_it() {
    let dir = TempDir::new("etcd-unreachable");
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    dir.config(&format!(
        "[registry]\nstore = \"etcd\"\nendpoints = [\"{endpoint}\"]\nconnect_timeout = \"1s\"\n"
    ));
    let started = Instant::now();
    let output = gateway(&dir.0).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&endpoint), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15));
}
