//! The file store with the real binary (SPEC §7): what was acknowledged
//! survives a `kill -9`, and a store that cannot be read stops the gateway
//! with a message instead of an empty registry.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::process::{Running, TempDir, call, gateway, listed};
use http::{Method, StatusCode};
use serde_json::json;
use tokio::sync::mpsc;

/// The file store at `registry.db`, before any `extra` sections.
fn file_config(dir: &TempDir, extra: &str) -> PathBuf {
    dir.config(&format!(
        "[registry]\nstore = \"file\"\npath = \"registry.db\"\n{extra}"
    ))
}

/// What a client was told.
enum Ack {
    Registered(String, String),
    /// A delete was sent: its outcome is unknown until acknowledged.
    DeleteSent(String, String),
    Deleted(String, String),
}

/// One client: registers new instances of its own service as fast as it is
/// answered, and deletes every fourth one it registered, until the gateway
/// disappears.
async fn client_loop(
    addr: String,
    round: usize,
    client_no: usize,
    acks: mpsc::UnboundedSender<Ack>,
) {
    let client = common::client();
    let service = format!("svc-{client_no}");
    let mut n = 0;
    loop {
        n += 1;
        let url = format!("http://10.{round}.{client_no}.1:{}", 1000 + n);
        let registration = json!({
            "name": service,
            "url": url,
            "metadata": {"round": round.to_string(), "n": n.to_string()},
        });
        let Some((status, body)) = call(
            &client,
            Method::POST,
            format!("http://{addr}/services"),
            Some(registration),
        )
        .await
        else {
            return;
        };
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        let _ = acks.send(Ack::Registered(service.clone(), id.clone()));
        if n % 4 == 0 {
            let _ = acks.send(Ack::DeleteSent(service.clone(), id.clone()));
            let path = format!("http://{addr}/services/{service}/instances/{id}");
            let Some((status, _)) = call(&client, Method::DELETE, path, None).await else {
                return;
            };
            assert_eq!(status, StatusCode::NO_CONTENT);
            let _ = acks.send(Ack::Deleted(service.clone(), id));
        }
    }
}

/// The books of what was acknowledged, across rounds.
#[derive(Default)]
struct Books {
    /// Acknowledged registrations whose delete was never sent.
    present: HashSet<(String, String)>,
    /// Acknowledged deletes.
    deleted: HashSet<(String, String)>,
}

impl Books {
    fn take(&mut self, ack: Ack) {
        match ack {
            Ack::Registered(s, i) => {
                self.present.insert((s, i));
            }
            Ack::DeleteSent(s, i) => {
                self.present.remove(&(s, i));
            }
            Ack::Deleted(s, i) => {
                self.deleted.insert((s, i));
            }
        }
    }

    async fn check(&self, gw: &Running) {
        let listed = listed(gw).await;
        for key in &self.present {
            assert!(listed.contains_key(key), "acknowledged but lost: {key:?}");
        }
        for key in &self.deleted {
            assert!(!listed.contains_key(key), "deleted but back: {key:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9_mid_stream() {
    let dir = TempDir::new("soak");
    file_config(&dir, "");
    let mut books = Books::default();
    for round in 0..4 {
        let gw = Running::start(&dir);
        books.check(&gw).await;

        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut acked = 0;
        let clients: Vec<_> = (0..8)
            .map(|c| tokio::spawn(client_loop(gw.addr.clone(), round, c, tx.clone())))
            .collect();
        drop(tx);
        // Kill it while all 8 are writing: after 300 acknowledgements.
        while acked < 300 {
            let ack = rx.recv().await.expect("clients are running");
            if matches!(ack, Ack::Registered(..)) {
                acked += 1;
            }
            books.take(ack);
        }
        gw.kill();
        for client in clients {
            client.await.unwrap();
        }
        while let Some(ack) = rx.recv().await {
            books.take(ack);
        }
        assert!(!books.deleted.is_empty());
    }
    let gw = Running::start(&dir);
    books.check(&gw).await;
    // Loaded as unknown with a closed circuit.
    for instance in listed(&gw).await.values() {
        assert_eq!(instance["status"], "unknown");
        assert_eq!(instance["circuit"], "closed");
    }
}

#[tokio::test]
async fn a_restart_keeps_metadata_and_drain_state() {
    let dir = TempDir::new("restart");
    file_config(&dir, "");
    let gw = Running::start(&dir);
    let client = common::client();
    let (status, body) = call(
        &client,
        Method::POST,
        gw.url("/services"),
        Some(json!({
            "name": "api",
            "url": "http://10.0.0.1:8080",
            "id": "api-1",
            "metadata": {"zone": "b", "version": "1.4.2"},
            "ttl": "1h",
        })),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = gw
        .send(
            Method::PUT,
            "/services/api/instances/api-1/state",
            Some(json!({"state": "draining"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    gw.kill();

    let gw = Running::start(&dir);
    let listed = listed(&gw).await;
    let instance = &listed[&("api".to_string(), "api-1".to_string())];
    assert_eq!(instance["url"], "http://10.0.0.1:8080");
    assert_eq!(
        instance["metadata"],
        json!({"zone": "b", "version": "1.4.2"})
    );
    assert_eq!(instance["state"], "draining");
    assert_eq!(instance["reason"], "draining");
    assert_eq!(instance["status"], "unknown");
    // Its TTL restarted from the load: a heartbeat finds it.
    let (status, _) = gw
        .send(Method::PUT, "/services/api/instances/api-1/heartbeat", None)
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn static_services_merge_in_and_the_file_wins_for_its_ids() {
    let dir = TempDir::new("merge");
    file_config(
        &dir,
        "[[services]]\nname = \"api\"\nurls = [\"http://10.0.0.1:80\", \"http://10.0.0.2:80\"]\n",
    );
    let gw = Running::start(&dir);
    // Drained: the stored registration of a static id, which must win.
    let (status, _) = gw
        .send(
            Method::PUT,
            "/services/api/instances/10.0.0.1:80/state",
            Some(json!({"state": "draining"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    gw.kill();
    let gw = Running::start(&dir);
    let listed = listed(&gw).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        listed[&("api".to_string(), "10.0.0.1:80".to_string())]["state"],
        "draining"
    );
    assert_eq!(
        listed[&("api".to_string(), "10.0.0.2:80".to_string())]["state"],
        "active"
    );
}

/// Starts the binary on `dir` expecting it to refuse: exit 1, stderr.
fn refused(dir: &TempDir) -> String {
    let output = gateway(&dir.0).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
    stderr
}

#[test]
fn a_file_that_is_not_a_store_stops_the_start_naming_it() {
    let dir = TempDir::new("garbage");
    file_config(&dir, "");
    std::fs::write(
        dir.path("registry.db"),
        b"name,url\napi,http://10.0.0.1\n".repeat(200),
    )
    .unwrap();
    let stderr = refused(&dir);
    assert!(stderr.contains("registry.db"), "{stderr}");
    assert!(stderr.contains("registry store"), "{stderr}");
}

#[tokio::test]
async fn a_truncated_store_stops_the_start_naming_it() {
    let dir = TempDir::new("truncated");
    file_config(&dir, "");
    let gw = Running::start(&dir);
    for n in 0..200 {
        let (status, _) = gw
            .send(
                Method::POST,
                "/services",
                Some(json!({"name": "api", "url": format!("http://10.0.0.1:{}", 1000 + n)})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    gw.kill();
    let path = dir.path("registry.db");
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len / 3).unwrap();
    drop(file);
    let stderr = refused(&dir);
    assert!(stderr.contains("registry.db"), "{stderr}");
}

#[test]
fn a_store_path_that_is_a_directory_stops_the_start() {
    let dir = TempDir::new("directory");
    file_config(&dir, "");
    std::fs::create_dir_all(dir.path("registry.db")).unwrap();
    let stderr = refused(&dir);
    assert!(stderr.contains("registry.db"), "{stderr}");
}

#[test]
fn check_config_names_the_store() {
    let dir = TempDir::new("check");
    let config = file_config(&dir, "");
    let output = gateway(&dir.0)
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("store = \"file\""), "{stdout}");
    assert!(
        stdout.contains("# registry store: file registry.db"),
        "{stdout}"
    );
    assert!(
        !dir.path("registry.db").exists(),
        "check-config opens nothing"
    );
}
