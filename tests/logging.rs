//! The logging handle, `switchyard::log::Logging`: the format and the
//! access log change while the gateway runs, from the next line and the
//! next request on. It installs the process's one subscriber, so this
//! binary holds this one test (and expects `RUST_LOG` unset or at `info`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::eventually;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use switchyard::config::{LogConfig, LogFormat};
use switchyard::log::Logging;
use switchyard::{Config, Gateway, server};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// What the logging thread wrote.
#[derive(Clone, Default)]
struct Written(Arc<Mutex<Vec<u8>>>);

impl Written {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn line_with(&self, needle: &str) -> Option<String> {
        self.lines().into_iter().find(|l| l.contains(needle))
    }

    async fn wait_for(&self, needle: &str) -> String {
        eventually(Duration::from_secs(10), needle, || async {
            self.line_with(needle).is_some()
        })
        .await;
        self.line_with(needle).unwrap_or_default()
    }
}

impl std::io::Write for Written {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_switches_the_format_and_the_access_log_while_running() {
    let written = Written::default();
    let logging = Logging::init_writing_to(&LogConfig::default(), written.clone())
        .expect("the only subscriber of this binary");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config::from_toml("[health_check]\ninterval = \"0s\"\n").unwrap();
    config.gateway.listen = addr;
    let gateway = Gateway::with_access_switch(config, logging.access_switch().clone())
        .await
        .unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server::run(listener, gateway, async {
        let _ = stopped.await;
    }));
    let client = common::client();
    let call = async |n: u32| {
        let request = Request::get(format!("http://{addr}/call/nowhere/{n}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = common::send(&client, request).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        reply.header("x-request-id").unwrap().to_string()
    };

    // Text, the access log off: a line written after the call, and none for it.
    let id = call(1).await;
    tracing::info!("after the first call");
    let marker = written.wait_for("after the first call").await;
    assert!(serde_json::from_str::<Value>(&marker).is_err(), "{marker}");
    assert!(marker.contains(" INFO "), "{marker}");
    assert!(written.line_with(&id).is_none(), "{:#?}", written.lines());

    logging
        .apply(&LogConfig {
            access: true,
            format: LogFormat::Json,
        })
        .unwrap();
    let id = call(2).await;
    let line: Value = serde_json::from_str(&written.wait_for(&id).await).unwrap();
    assert_eq!(line["target"], "switchyard::access");
    assert_eq!(line["path"], "/2");
    assert_eq!(line["status"], 503);

    logging
        .apply(&LogConfig {
            access: false,
            format: LogFormat::Text,
        })
        .unwrap();
    let id = call(3).await;
    tracing::info!("after the third call");
    let marker = written.wait_for("after the third call").await;
    assert!(serde_json::from_str::<Value>(&marker).is_err(), "{marker}");
    assert!(written.line_with(&id).is_none(), "{:#?}", written.lines());
}
