//! The file store with the real binary (SPEC §7): what was acknowledged
//! survives a `kill -9`, and a store that cannot be read stops the gateway
//! with a message instead of an empty registry.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::TestClient;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A fresh directory for one test's files, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-durability-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A `gateway.toml` with the file store at `registry.db`, checks off.
    fn config(&self, extra: &str) -> PathBuf {
        let path = self.path("gateway.toml");
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\
             [health_check]\ninterval = \"0s\"\n\
             [registry]\nstore = \"file\"\npath = \"registry.db\"\n{extra}"
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn gateway(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(dir);
    for var in ["SERVICE_PORT", "SERVICE_NAME", "SWITCHYARD_ADMIN_TOKEN"] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "info");
    command
}

/// The gateway process, killed with SIGKILL when dropped.
struct Running {
    child: Child,
    addr: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    fn start(dir: &TempDir) -> Self {
        let mut child = gateway(&dir.0)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Self {
            child,
            addr: String::new(),
            lines,
        };
        let line = running.wait_for("listening");
        running.addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the listening line names the address")
            .to_string();
        running
    }

    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// `kill -9`: no chance to flush or close anything.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request; `None` when the gateway is gone.
async fn call(
    client: &TestClient,
    method: Method,
    url: String,
    body: Option<serde_json::Value>,
) -> Option<(StatusCode, serde_json::Value)> {
    let mut builder = Request::builder().method(method).uri(url);
    let body = match body {
        Some(json) => {
            builder = builder.header("content-type", "application/json");
            Bytes::from(json.to_string())
        }
        None => Bytes::new(),
    };
    let response = client
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .ok()?;
    let status = response.status();
    let bytes = response.into_body().collect().await.ok()?.to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Some((status, json))
}

/// Every instance the gateway lists, as `(service, id) → instance`,
/// asserting none is listed twice.
async fn listed(gw: &Running) -> HashMap<(String, String), serde_json::Value> {
    let client = common::client();
    let (status, services) = call(&client, Method::GET, gw.url("/services"), None)
        .await
        .expect("the gateway answers");
    assert_eq!(status, StatusCode::OK);
    let mut all = HashMap::new();
    let mut urls = HashSet::new();
    for service in services.as_array().unwrap() {
        for instance in service["instances"].as_array().unwrap() {
            let key = (
                instance["service"].as_str().unwrap().to_string(),
                instance["id"].as_str().unwrap().to_string(),
            );
            let url = instance["url"].as_str().unwrap().to_string();
            assert!(urls.insert((key.0.clone(), url)), "listed twice: {key:?}");
            assert!(
                all.insert(key.clone(), instance.clone()).is_none(),
                "{key:?}"
            );
        }
    }
    all
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
    dir.config("");
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
    dir.config("");
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
    let (status, body) = call(
        &client,
        Method::PUT,
        gw.url("/services/api/instances/api-1/state"),
        Some(json!({"state": "draining"})),
    )
    .await
    .unwrap();
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
    let (status, _) = call(
        &client,
        Method::PUT,
        gw.url("/services/api/instances/api-1/heartbeat"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn static_services_merge_in_and_the_file_wins_for_its_ids() {
    let dir = TempDir::new("merge");
    dir.config(
        "[[services]]\nname = \"api\"\nurls = [\"http://10.0.0.1:80\", \"http://10.0.0.2:80\"]\n",
    );
    let gw = Running::start(&dir);
    let client = common::client();
    // Drained: the stored registration of a static id, which must win.
    let (status, _) = call(
        &client,
        Method::PUT,
        gw.url("/services/api/instances/10.0.0.1:80/state"),
        Some(json!({"state": "draining"})),
    )
    .await
    .unwrap();
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
    dir.config("");
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
    dir.config("");
    let gw = Running::start(&dir);
    let client = common::client();
    for n in 0..200 {
        let (status, _) = call(
            &client,
            Method::POST,
            gw.url("/services"),
            Some(json!({"name": "api", "url": format!("http://10.0.0.1:{}", 1000 + n)})),
        )
        .await
        .unwrap();
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
    dir.config("");
    std::fs::create_dir_all(dir.path("registry.db")).unwrap();
    let stderr = refused(&dir);
    assert!(stderr.contains("registry.db"), "{stderr}");
}

#[test]
fn check_config_names_the_store() {
    let dir = TempDir::new("check");
    let config = dir.config("");
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
