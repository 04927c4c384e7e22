//! The real `switchyard` binary as a child process, for the tests that
//! kill it, restart it or run several: a temp directory for its files, its
//! log lines on a channel, and a small client.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use super::TestClient;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A fresh directory for one test's files, removed afterwards.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("switchyard-process-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A `gateway.toml` on a free port, two workers, checks off, then
    /// `extra`.
    pub fn config(&self, extra: &str) -> PathBuf {
        let path = self.path("gateway.toml");
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\
             [health_check]\ninterval = \"0s\"\n{extra}"
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

pub fn gateway(dir: &Path) -> Command {
    under(&[], dir)
}

/// The binary run by `wrapper`, a program and its arguments that exec it
/// (`prlimit ... --`, say; the child's pid is then the gateway's), in
/// `dir`.
pub fn under(wrapper: &[&str], dir: &Path) -> Command {
    let mut command = match wrapper {
        [] => Command::new(BIN),
        [program, args @ ..] => {
            let mut command = Command::new(program);
            command.args(args).arg(BIN);
            command
        }
    };
    command.current_dir(dir);
    for var in ["SERVICE_PORT", "SERVICE_NAME", "SWITCHYARD_ADMIN_TOKEN"] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "info");
    command
}

/// The gateway process, killed with SIGKILL when dropped.
pub struct Running {
    pub child: Child,
    pub addr: String,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stderr line read so far, in order.
    pub seen: Vec<String>,
}

impl Running {
    pub fn start(dir: &TempDir) -> Self {
        Self::spawn(gateway(&dir.0))
    }

    /// `command`, which runs the gateway, until it listens.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
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
            seen: Vec::new(),
        };
        let line = running.wait_for("listening");
        running.addr = listening_addr(&line);
        running
    }

    pub fn wait_for(&mut self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no log line with {needle:?} in {:#?}", self.seen));
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// SIGTERM, then every line written until it exits; its exit status.
    pub fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(20)) {
            rest.push(line);
        }
        (self.child.wait().unwrap(), rest)
    }

    /// `kill -HUP`: the gateway reloads its configuration.
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -HUP");
    }

    /// `kill -9`: no chance to flush or close anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One request to it, on a client of its own; panics when it is gone.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        call(&super::client(), method, self.url(path), body)
            .await
            .expect("the gateway answers")
    }
}

/// The address the "switchyard listening" line names, in either log format.
fn listening_addr(line: &str) -> String {
    let addr = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(json) => json["addr"].as_str().map(str::to_string),
        Err(_) => line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string),
    };
    addr.expect("the listening line names the address")
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request; `None` when the gateway is gone.
pub async fn call(
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
pub async fn listed(gw: &Running) -> HashMap<(String, String), serde_json::Value> {
    let client = super::client();
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
