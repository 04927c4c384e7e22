use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::{Layer, Service, ServiceExt};
use tracing_subscriber::layer::SubscriberExt;

use super::{AccessLogLayer, AccessSwitch};
use crate::body::{self, Body, BoxError};
use crate::proxy::Served;

/// The JSON lines written while it is the thread's subscriber.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Lines {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let lines = self.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(move || lines.clone()),
        );
        tracing::subscriber::set_default(subscriber)
    }

    fn access(&self) -> Vec<Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|line| line["target"] == super::TARGET)
            .collect()
    }
}

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A body of separate frames, each ready when polled.
struct Chunks(VecDeque<Bytes>);

impl Chunks {
    fn body(chunks: &[&'static [u8]]) -> Body {
        body::boxed(Self(chunks.iter().map(|c| Bytes::from_static(c)).collect()))
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// An instance stand-in: reads the request body whole, then answers 201
/// with `chunks`, served by instance `i-1` after two attempts.
fn upstream(
    chunks: &'static [&'static [u8]],
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> {
    tower::service_fn(move |request: Request<Body>| async move {
        let read = request.into_body().collect().await.unwrap().to_bytes();
        assert!(!read.is_empty());
        let mut response = Response::new(Chunks::body(chunks));
        *response.status_mut() = StatusCode::CREATED;
        response.extensions_mut().insert(Served {
            instance: Some("i-1".into()),
            attempts: 2,
        });
        Ok::<_, Infallible>(response)
    })
}

fn call(method: &str, path: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("x-request-id", "req-7")
        .body(body)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn one_line_when_the_body_ends_with_every_field() {
    let lines = Lines::default();
    let _guard = lines.capture();
    let mut service =
        AccessLogLayer::new(AccessSwitch::new(true)).layer(upstream(&[b"abc", b"defg"]));
    let request = call(
        "POST",
        "/call/orders/v1/items?secret=1",
        Chunks::body(&[b"12345", b"678"]),
    );
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    assert!(
        response.extensions().get::<Served>().is_none(),
        "taken by the log"
    );
    tokio::time::advance(Duration::from_micros(250_500)).await;
    let mut body = response.into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "abc"
    );
    assert!(
        lines.access().is_empty(),
        "written only when the body is over"
    );
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "defg"
    );
    let written = lines.access();
    assert_eq!(written.len(), 1, "{written:?}");
    let line = &written[0];
    assert_eq!(line["request_id"], "req-7");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["service"], "orders");
    assert_eq!(line["path"], "/v1/items", "without the query");
    assert_eq!(line["instance"], "i-1");
    assert_eq!(line["status"], 201);
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["duration_ms"], 250.5);
    assert_eq!(line["bytes_in"], 8);
    assert_eq!(line["bytes_out"], 7);
    assert!(body.frame().await.is_none());
    drop(body);
    assert_eq!(lines.access().len(), 1, "one line, not one more at drop");
}

#[tokio::test]
async fn a_body_dropped_midway_still_gets_its_line() {
    let lines = Lines::default();
    let _guard = lines.capture();
    let mut service =
        AccessLogLayer::new(AccessSwitch::new(true)).layer(upstream(&[b"abc", b"defg"]));
    let request = call("PUT", "/call/orders", body::full("x"));
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    assert!(lines.access().is_empty());
    drop(body);
    let written = lines.access();
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0]["path"], "");
    assert_eq!(written[0]["bytes_out"], 3);
    assert_eq!(written[0]["status"], 201);
}

#[tokio::test]
async fn a_client_gone_before_the_answer_is_499_with_no_instance() {
    let lines = Lines::default();
    let _guard = lines.capture();
    let never = tower::service_fn(|_: Request<Body>| {
        std::future::pending::<Result<Response<Body>, Infallible>>()
    });
    let mut service = AccessLogLayer::new(AccessSwitch::new(true)).layer(never);
    let waiting = service.call(call("GET", "/call/slow/x", body::empty()));
    drop(waiting);
    let written = lines.access();
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0]["status"], 499);
    assert_eq!(written[0]["instance"], "-");
    assert_eq!(written[0]["attempts"], 0);
    assert_eq!(written[0]["bytes_in"], 0);
}

#[tokio::test]
async fn the_switch_decides_per_request_and_only_calls_are_logged() {
    let lines = Lines::default();
    let _guard = lines.capture();
    let switch = AccessSwitch::new(false);
    let mut service = AccessLogLayer::new(switch.clone()).layer(upstream(&[b"ok"]));
    let mut send = async |path: &str| {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(call("POST", path, body::full("x")))
            .await
            .unwrap();
        let served = response.extensions().get::<Served>().cloned();
        response.into_body().collect().await.unwrap();
        served
    };
    assert!(send("/call/a/").await.is_some(), "passed through untouched");
    assert!(lines.access().is_empty());
    switch.set(true);
    assert!(send("/services").await.is_some());
    assert!(lines.access().is_empty(), "not a proxied request");
    send("/call/a/").await;
    assert_eq!(lines.access().len(), 1);
    switch.set(false);
    send("/call/a/").await;
    assert_eq!(lines.access().len(), 1);
}

#[tokio::test]
async fn a_filtered_out_target_costs_no_entry() {
    let lines = Lines::default();
    let filtered = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(
            "info,switchyard::access=off",
        ))
        .with(tracing_subscriber::fmt::layer().json().with_writer({
            let lines = lines.clone();
            move || lines.clone()
        }));
    let _guard = tracing::subscriber::set_default(filtered);
    let mut service = AccessLogLayer::new(AccessSwitch::new(true)).layer(upstream(&[b"ok"]));
    let response = service
        .ready()
        .await
        .unwrap()
        .call(call("POST", "/call/a/", body::full("x")))
        .await
        .unwrap();
    assert!(
        response.extensions().get::<Served>().is_some(),
        "the response went through unwrapped"
    );
    response.into_body().collect().await.unwrap();
    assert!(lines.0.lock().unwrap().is_empty());
}
