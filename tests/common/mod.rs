//! Shared pieces of the end-to-end tests: the real gateway on 127.0.0.1:0, a
//! small HTTP client, and fake upstreams.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use switchyard::{Config, Gateway, server};

/// A reply: status, headers, body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The gateway's error code, asserting the SPEC §4 shape on the way.
    pub fn error_code(&self) -> String {
        let json = self.json();
        let code = json["error"]["code"]
            .as_str()
            .expect("error.code")
            .to_string();
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert_eq!(self.header("x-switchyard-error"), Some(code.as_str()));
        assert_eq!(self.header("content-type"), Some("application/json"));
        code
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The real gateway, serving on an ephemeral port until dropped or stopped.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub client: TestClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestGateway {
    /// Starts the gateway with `toml` (validated as the binary would).
    pub async fn start(toml: &str) -> Self {
        Self::start_with(toml, None).await
    }

    /// Starts the gateway with its random picks seeded, so they repeat.
    pub async fn start_seeded(toml: &str, seed: u64) -> Self {
        Self::start_with(toml, Some(seed)).await
    }

    async fn start_with(toml: &str, seed: Option<u64>) -> Self {
        let mut config = Config::from_toml(toml).expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The gateway must know where it really listens (its own address is
        // outside the upstream policy).
        config.gateway.listen = addr;
        let gateway = match seed {
            Some(seed) => Gateway::with_seed(config, seed),
            None => Gateway::new(config),
        }
        .expect("gateway starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, gateway.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            gateway,
            client: client(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        send(&self.client, request).await
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut builder = Request::builder().method(method).uri(self.url(path));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        self.send(
            builder
                .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
                .unwrap(),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path, "", &[]).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.request(Method::DELETE, path, "", &[]).await
    }

    pub async fn post_json(&self, path: &str, json: &serde_json::Value) -> Reply {
        self.request(
            Method::POST,
            path,
            &json.to_string(),
            &[("content-type", "application/json")],
        )
        .await
    }

    /// Registers `url` under `name`, asserting 201.
    pub async fn register(&self, name: &str, url: &str) -> serde_json::Value {
        let reply = self
            .post_json("/services", &serde_json::json!({"name": name, "url": url}))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        reply.json()
    }

    /// Signals shutdown and waits for `server::run` to return.
    pub async fn shutdown(mut self) {
        self.signal_shutdown();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    pub fn signal_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn take_task(&mut self) -> tokio::task::JoinHandle<()> {
        self.task.take().expect("server task")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.gateway.stop_background();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub async fn send(client: &TestClient, request: Request<Full<Bytes>>) -> Reply {
    let response = client
        .request(request)
        .await
        .expect("request reaches the server");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Polls `condition` until it holds, failing after `within`. For state that
/// changes in the background (periodic health checks): it waits for the
/// condition itself, never for a guessed duration.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fake upstream: an HTTP/1 server on 127.0.0.1:0 answering with `handler`.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start<H, Fut>(handler: H) -> Self
    where
        H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops accepting; connections already open stay up until they close.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn response(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

/// An upstream whose answers wait for the test: each request reports its
/// arrival on `entered`, then waits for `release` before answering 200 with
/// `body`.
pub struct Gated {
    pub upstream: Upstream,
    pub entered: tokio::sync::mpsc::UnboundedReceiver<()>,
    pub release: Arc<tokio::sync::Notify>,
}

impl Gated {
    pub async fn start(body: &'static str) -> Self {
        let release = Arc::new(tokio::sync::Notify::new());
        let (entered_tx, entered) = tokio::sync::mpsc::unbounded_channel();
        let r = release.clone();
        let upstream = Upstream::start(move |_| {
            let (r, entered_tx) = (r.clone(), entered_tx.clone());
            async move {
                let _ = entered_tx.send(());
                r.notified().await;
                response(200, body)
            }
        })
        .await;
        Self {
            upstream,
            entered,
            release,
        }
    }
}

/// A streamed request body of `count` chunks of `size` bytes, with no
/// `Content-Length`.
pub struct Chunks {
    left: usize,
    chunk: Bytes,
}

impl Chunks {
    pub fn new(count: usize, size: usize) -> Self {
        Self {
            left: count,
            chunk: Bytes::from(vec![b' '; size]),
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.clone()))))
    }
}

/// An upstream that answers every request with the status the test sets
/// (200 to start) and a JSON echo of what it received, counting requests.
pub struct Echo {
    pub upstream: Upstream,
    pub status: Arc<std::sync::atomic::AtomicU16>,
    /// Requests whose head arrived.
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests whose body arrived complete.
    pub complete: Arc<std::sync::atomic::AtomicUsize>,
    pub name: String,
}

impl Echo {
    pub async fn start(name: &str) -> Self {
        use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
        let status = Arc::new(AtomicU16::new(200));
        let hits = Arc::new(AtomicUsize::new(0));
        let complete = Arc::new(AtomicUsize::new(0));
        let (s, h, c, n) = (
            status.clone(),
            hits.clone(),
            complete.clone(),
            name.to_string(),
        );
        let upstream = Upstream::start(move |request: Request<Incoming>| {
            let (s, h, c, n) = (s.clone(), h.clone(), c.clone(), n.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let (parts, body) = request.into_parts();
                let body = match body.collect().await {
                    Ok(body) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        body.to_bytes()
                    }
                    Err(_) => Bytes::new(),
                };
                let mut headers = serde_json::Map::new();
                for name in parts.headers.keys() {
                    let values: Vec<_> = parts
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|v| serde_json::Value::from(v.to_str().unwrap_or("<binary>")))
                        .collect();
                    headers.insert(name.as_str().to_string(), values.into());
                }
                let echo = serde_json::json!({
                    "name": n,
                    "method": parts.method.as_str(),
                    "uri": parts.uri.to_string(),
                    "version": format!("{:?}", parts.version),
                    "headers": headers,
                    "body_len": body.len(),
                    "body_sum": body.iter().map(|&b| u64::from(b)).sum::<u64>(),
                });
                let mut response = response(s.load(Ordering::SeqCst), echo.to_string());
                response
                    .headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                response
            }
        })
        .await;
        Self {
            upstream,
            status,
            hits,
            complete,
            name: name.to_string(),
        }
    }

    pub fn url(&self) -> String {
        self.upstream.url()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_status(&self, status: u16) {
        self.status
            .store(status, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A TCP upstream that accepts connections and reads requests but never
/// answers: a hung instance. Counts connections.
pub struct Hang {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Hang {
    pub async fn start() -> Self {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Hang {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address nothing listens on (bound once, then released).
pub async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}
