//! A real browser for the tests that look at a page as a person would:
//! Debian's headless chromium, driven over the DevTools protocol.
//!
//! Chromium is started with `--remote-debugging-port=0` and a profile of
//! its own; it prints the websocket address it picked on stderr. One
//! websocket to the browser carries everything: a tab is attached in
//! "flatten" mode, so its commands go on the same socket with its session
//! id. The process is killed and its profile removed when the [`Browser`]
//! is dropped, the test's failure included.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::process::TempDir;

pub const CHROMIUM: &str = "/usr/bin/chromium";

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Headless chromium, killed on drop.
pub struct Browser {
    child: Child,
    socket: Mutex<Socket>,
    next_id: AtomicU64,
    _profile: TempDir,
}

/// One tab of a [`Browser`].
pub struct Tab<'a> {
    browser: &'a Browser,
    session: String,
}

impl Browser {
    /// Starts chromium, failing the test with what to do if it is missing.
    pub async fn launch() -> Self {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: this test needs Debian's chromium, which .ci/run \
             installs (apt-get install chromium)"
        );
        static LAUNCHED: AtomicU64 = AtomicU64::new(0);
        let profile = TempDir::new(&format!(
            "chromium-{}",
            LAUNCHED.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{CHROMIUM} does not start: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let (address, found) = std::sync::mpsc::channel();
        // Reads stderr to its end, so chromium never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://") {
                    let _ = address.send(line[at..].trim().to_string());
                }
            }
        });
        let guard = Killed(Some(child));
        let address =
            tokio::task::spawn_blocking(move || found.recv_timeout(Duration::from_secs(30)))
                .await
                .expect("the reader thread")
                .expect("chromium prints \"DevTools listening on ws://...\" within 30 s");
        let (socket, _) = tokio_tungstenite::connect_async(address.as_str())
            .await
            .expect("the DevTools websocket opens");
        Self {
            child: guard.take(),
            socket: Mutex::new(socket),
            next_id: AtomicU64::new(1),
            _profile: profile,
        }
    }

    /// Opens `url` in a new tab.
    pub async fn open(&self, url: &str) -> Tab<'_> {
        let target = self
            .call(None, "Target.createTarget", json!({"url": url}))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        Tab {
            browser: self,
            session: attached["sessionId"]
                .as_str()
                .expect("a session id")
                .to_string(),
        }
    }

    /// Sends one command and returns its result, skipping the events that
    /// arrive meanwhile.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = session.into();
        }
        let mut socket = self.socket.lock().await;
        socket
            .send(Message::text(command.to_string()))
            .await
            .expect("DevTools takes the command");
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let message = socket
                    .next()
                    .await
                    .expect("DevTools answers")
                    .expect("a websocket message");
                let Message::Text(text) = message else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools speaks JSON");
                if value["id"] == id {
                    return value;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"));
        assert!(answer["error"].is_null(), "{method}: {}", answer["error"]);
        answer["result"].clone()
    }
}

impl Tab<'_> {
    /// A DevTools command to this tab.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// The value of the JavaScript `expression` in the page.
    pub async fn evaluate(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression} threw: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// The page's text as it is rendered: what a person reads (collapsed
    /// sections' contents are not in it).
    pub async fn text(&self) -> String {
        self.evaluate("document.body ? document.body.innerText : ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Cuts the tab off the network (`true`) or puts it back.
    pub async fn set_offline(&self, offline: bool) {
        self.call("Network.enable", json!({})).await;
        self.call(
            "Network.emulateNetworkConditions",
            json!({
                "offline": offline,
                "latency": 0,
                "downloadThroughput": -1,
                "uploadThroughput": -1,
            }),
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills chromium if the launch fails before the [`Browser`] owns it.
struct Killed(Option<Child>);

impl Killed {
    fn take(mut self) -> Child {
        self.0.take().expect("taken once")
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
