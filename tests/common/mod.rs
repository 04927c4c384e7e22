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
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use switchyard::reload::ReloadReport;
use switchyard::{Config, Gateway, server};

pub mod browser;
pub mod process;

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

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Any request body, boxed, so one client type carries them all.
pub type AnyBody = UnsyncBoxBody<Bytes, BoxError>;

/// How a test's requests reach the gateway. A request can take different
/// paths through the gateway's HTTP handling depending on what came before
/// it on its connection and on the protocol, so the end-to-end scenarios
/// run each way: [`each_way!`] makes one test per way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// HTTP/1.1, every request on a connection of its own.
    Fresh,
    /// HTTP/1.1, every request on a connection of its own that has first
    /// carried a registry call (`GET /services`, answered 200).
    Warm,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
}

impl Way {
    pub fn is_http1(self) -> bool {
        self != Way::H2c
    }
}

/// The registry call that warms a raw HTTP/1.1 connection.
pub const WARM_UP: &[u8] = b"GET /services HTTP/1.1\r\nHost: gw\r\n\r\n";

/// Sends requests to the gateway one [`Way`], or, with none, as the tests
/// always did (HTTP/1.1 on pooled keep-alive connections). Cheap to clone.
#[derive(Clone)]
pub struct Caller {
    addr: SocketAddr,
    way: Option<Way>,
    client: Client<HttpConnector, AnyBody>,
}

impl Caller {
    pub fn new(addr: SocketAddr, way: Option<Way>) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        match way {
            Some(Way::Fresh) => {
                builder.pool_max_idle_per_host(0);
            }
            Some(Way::H2c) => {
                builder.http2_only(true);
            }
            // Warm requests go on connections of their own (see `warm`).
            Some(Way::Warm) | None => {}
        }
        Self {
            addr,
            way,
            client: builder.build_http(),
        }
    }

    pub fn way(&self) -> Option<Way> {
        self.way
    }

    /// Sends `request` and returns the response as it comes, its body
    /// still streaming; `Err` if the exchange broke before the head.
    pub async fn response<B>(&self, request: Request<B>) -> Result<Response<Incoming>, BoxError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let request = request.map(|body| UnsyncBoxBody::new(body.map_err(Into::into)));
        match self.way {
            Some(Way::Warm) => warm(self.addr, request).await,
            _ => Ok(self.client.request(request).await?),
        }
    }

    /// Sends `request` and reads the whole response.
    pub async fn send<B>(&self, request: Request<B>) -> Reply
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let way = self.way;
        let response = self
            .response(request)
            .await
            .unwrap_or_else(|e| panic!("request reaches the server ({way:?}): {e:?}"));
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("a whole body ({way:?}): {e:?}"))
            .to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

/// One request on a new HTTP/1.1 connection that first carries a registry
/// call. The connection is the request's own: it closes once the response
/// has been read (or dropped).
async fn warm(addr: SocketAddr, request: Request<AnyBody>) -> Result<Response<Incoming>, BoxError> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, AnyBody>(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let warm_up = Request::get("/services")
        .header(http::header::HOST, "gw")
        .body(UnsyncBoxBody::new(
            Full::new(Bytes::new()).map_err(|never| match never {}),
        ))
        .expect("a valid request");
    let answer = sender.send_request(warm_up).await?;
    assert_eq!(
        answer.status(),
        StatusCode::OK,
        "the registry call that warms the connection"
    );
    answer.into_body().collect().await?;
    sender.ready().await?;
    // What the legacy client does for HTTP/1: origin-form target, and the
    // authority in Host unless the request brings its own.
    let (mut parts, body) = request.into_parts();
    if let Some(authority) = parts.uri.authority().cloned()
        && !parts.headers.contains_key(http::header::HOST)
    {
        parts.headers.insert(
            http::header::HOST,
            authority
                .as_str()
                .parse()
                .expect("an authority is a valid Host"),
        );
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .expect("a path is a valid target");
    Ok(sender
        .send_request(Request::from_parts(parts, body))
        .await?)
}

/// A raw connection to the gateway for bytes written by hand: new for
/// `Fresh`; for `Warm`, one that has carried a registry call, answered 200
/// and read whole, before the bytes under test. HTTP/1 only.
pub async fn raw_connection(addr: SocketAddr, way: Way) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    match way {
        Way::Fresh => {}
        Way::Warm => {
            stream.write_all(WARM_UP).await.unwrap();
            let status = read_one_response(&mut stream).await;
            assert_eq!(status, 200, "the registry call that warms the connection");
        }
        Way::H2c => panic!("a raw HTTP/1 connection cannot go the h2c way"),
    }
    stream
}

/// Reads one whole response (Content-Length or chunked body) and not a
/// byte more; returns its status.
async fn read_one_response(stream: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let (status, head_len, length, chunked) = loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(len) = parsed.parse(&buf).expect("a valid response head")
        {
            let find = |name: &str| {
                parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
            };
            let length = find("content-length").map(|v| v.parse::<usize>().unwrap());
            let chunked = find("transfer-encoding").is_some_and(|v| v.contains("chunked"));
            break (parsed.code.unwrap(), len, length, chunked);
        }
        read_more(stream, &mut buf).await;
    };
    if chunked {
        // Ends with the last chunk and an empty trailer section.
        while !buf[head_len..].ends_with(b"0\r\n\r\n") {
            read_more(stream, &mut buf).await;
        }
    } else {
        let length = length.expect("a framed response");
        while buf.len() < head_len + length {
            read_more(stream, &mut buf).await;
        }
        assert_eq!(buf.len(), head_len + length, "nothing after the response");
    }
    status
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 16384];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
        .await
        .expect("an answer within 10 s")
        .expect("a readable connection");
    assert!(n > 0, "the connection closed mid-response");
    buf.extend_from_slice(&chunk[..n]);
}

/// An HTTP/2 (prior knowledge) connection of its own to the gateway, for
/// tests that need control of the stream: bodies that stall or abort,
/// responses never read.
pub async fn h2_connection(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<AnyBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, AnyBody>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("an HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

/// A request body the test feeds by hand through a [`BodyFeed`]: it ends
/// when the feed is finished, and fails (so the client aborts the upload:
/// HTTP/2 resets the stream, HTTP/1 drops the connection) when the feed is
/// dropped unfinished.
pub struct Piped {
    rx: mpsc::UnboundedReceiver<Option<Bytes>>,
    done: bool,
}

pub struct BodyFeed {
    tx: mpsc::UnboundedSender<Option<Bytes>>,
}

pub fn piped() -> (BodyFeed, Piped) {
    let (tx, rx) = mpsc::unbounded_channel();
    (BodyFeed { tx }, Piped { rx, done: false })
}

impl BodyFeed {
    pub fn send(&self, bytes: impl Into<Bytes>) {
        let _ = self.tx.send(Some(bytes.into()));
    }

    pub fn finish(self) {
        let _ = self.tx.send(None);
    }
}

impl http_body::Body for Piped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Some(bytes))) => Poll::Ready(Some(Ok(http_body::Frame::data(bytes)))),
            Poll::Ready(Some(None)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err("the upload was aborted".into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Turns each `async fn name(way: Way)` named into three tests, one per
/// [`Way`], in modules `fresh`, `warm` and `h2c`, so a failure names its
/// way. Names after `http1:` get the two HTTP/1.1 ways only (each says
/// why HTTP/2 does not apply). Use once per test file.
#[allow(unused_macros)]
macro_rules! each_way {
    ($($name:ident),* $(,)? $(; http1: $($h1:ident),* $(,)?)?) => {
        mod fresh {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::common::Way::Fresh).await
            })*
            $($(#[tokio::test]
            async fn $h1() {
                super::$h1(super::common::Way::Fresh).await
            })*)?
        }
        mod warm {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::common::Way::Warm).await
            })*
            $($(#[tokio::test]
            async fn $h1() {
                super::$h1(super::common::Way::Warm).await
            })*)?
        }
        mod h2c {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::common::Way::H2c).await
            })*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use each_way;

/// The real gateway, serving on an ephemeral port until dropped or stopped.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    /// A plain pooled HTTP/1.1 client, whatever the way.
    pub client: TestClient,
    /// What `send`, `request`, `get` and the rest go through.
    pub caller: Caller,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestGateway {
    /// Starts the gateway with `toml` (validated as the binary would).
    pub async fn start(toml: &str) -> Self {
        Self::start_with(toml, None, None).await
    }

    /// Starts the gateway with its random picks seeded, so they repeat.
    pub async fn start_seeded(toml: &str, seed: u64) -> Self {
        Self::start_with(toml, Some(seed), None).await
    }

    /// Starts the gateway with every request of the helpers going `way`.
    pub async fn start_way(toml: &str, way: Way) -> Self {
        Self::start_with(toml, None, Some(way)).await
    }

    /// Both of the above.
    pub async fn start_seeded_way(toml: &str, seed: u64, way: Way) -> Self {
        Self::start_with(toml, Some(seed), Some(way)).await
    }

    /// Starts the gateway on the listening socket the binary makes
    /// (`server::bind`: on Linux `TCP_NODELAY` inherited and accept
    /// deferred until a connection's first bytes), not a plain one.
    pub async fn start_on_bound(toml: &str) -> Self {
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Self::start_on(listener, toml, None, None).await
    }

    async fn start_with(toml: &str, seed: Option<u64>, way: Option<Way>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, toml, seed, way).await
    }

    async fn start_on(
        listener: TcpListener,
        toml: &str,
        seed: Option<u64>,
        way: Option<Way>,
    ) -> Self {
        let mut config = Config::from_toml(toml).expect("test config is valid");
        let addr = listener.local_addr().unwrap();
        // The gateway must know where it really listens (its own address is
        // outside the upstream policy).
        config.gateway.listen = addr;
        let gateway = match seed {
            Some(seed) => Gateway::with_seed(config, seed).await,
            None => Gateway::new(config).await,
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
            caller: Caller::new(addr, way),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The way requests go (`None`: started without one).
    pub fn way(&self) -> Option<Way> {
        self.caller.way()
    }

    pub async fn send<B>(&self, request: Request<B>) -> Reply
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.caller.send(request).await
    }

    /// A raw HTTP/1 connection that went this gateway's way (see
    /// [`raw_connection`]).
    pub async fn raw(&self) -> TcpStream {
        raw_connection(self.addr, self.way().unwrap_or(Way::Fresh)).await
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
        self.send_json(Method::POST, path, json).await
    }

    pub async fn put_json(&self, path: &str, json: &serde_json::Value) -> Reply {
        self.send_json(Method::PUT, path, json).await
    }

    async fn send_json(&self, method: Method, path: &str, json: &serde_json::Value) -> Reply {
        self.request(
            method,
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

    /// Reloads the gateway with `toml`, as the binary does on SIGHUP: the
    /// listen address stays the one bound. The gateway validates it.
    pub async fn reload(&self, toml: &str) -> ReloadReport {
        let mut config = Config::parse(toml, "reloaded").expect("test config parses");
        config.gateway.listen = self.addr;
        self.gateway.reload(config).await
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
    /// Requests whose body broke off (the connection closed or reset).
    pub broken: Arc<std::sync::atomic::AtomicUsize>,
    pub name: String,
}

impl Echo {
    pub async fn start(name: &str) -> Self {
        use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
        let status = Arc::new(AtomicU16::new(200));
        let hits = Arc::new(AtomicUsize::new(0));
        let complete = Arc::new(AtomicUsize::new(0));
        let broken = Arc::new(AtomicUsize::new(0));
        let (s, h, c, b, n) = (
            status.clone(),
            hits.clone(),
            complete.clone(),
            broken.clone(),
            name.to_string(),
        );
        let upstream = Upstream::start(move |request: Request<Incoming>| {
            let (s, h, c, b, n) = (s.clone(), h.clone(), c.clone(), b.clone(), n.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let (parts, body) = request.into_parts();
                let body = match body.collect().await {
                    Ok(body) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        body.to_bytes()
                    }
                    Err(_) => {
                        b.fetch_add(1, Ordering::SeqCst);
                        Bytes::new()
                    }
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
            broken,
            name: name.to_string(),
        }
    }

    pub fn url(&self) -> String {
        self.upstream.url()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn broken(&self) -> usize {
        self.broken.load(std::sync::atomic::Ordering::SeqCst)
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

/// Reads `stream` until the server closes it or `wait` passes. Returns what
/// was read and whether the server closed the connection.
pub async fn read_until_close(stream: &mut TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// One response read off raw bytes.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// The gateway's error code, asserting the SPEC §4 shape on the way.
    pub fn error_code(&self) -> String {
        let json = self.json();
        let code = json["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {json}"))
            .to_string();
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{json}"
        );
        assert_eq!(self.header("x-switchyard-error"), Some(code.as_str()));
        assert_eq!(self.header("content-type"), Some("application/json"));
        code
    }
}

/// The whole responses `bytes` holds, in order, interim (1xx) ones
/// included; bodies framed by Content-Length or chunked (none for 1xx, 204
/// and 304). A response cut off at the end is left out.
pub fn responses(bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    let mut rest = bytes;
    loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut fields);
        let Ok(httparse::Status::Complete(head_len)) = parsed.parse(rest) else {
            return out;
        };
        let status = parsed.code.expect("a parsed status");
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        rest = &rest[head_len..];
        let mut body = Vec::new();
        if (100..200).contains(&status) || status == 204 || status == 304 {
        } else if find("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            loop {
                let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return out;
                };
                let line = String::from_utf8_lossy(&rest[..line_end]).into_owned();
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .unwrap_or_else(|_| panic!("a chunk size: {line:?}"));
                if size == 0 {
                    // Trailers up to an empty line.
                    let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
                        return out;
                    };
                    rest = &rest[end + 4..];
                    break;
                }
                if rest.len() < line_end + 2 + size + 2 {
                    return out;
                }
                body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
                rest = &rest[line_end + 2 + size + 2..];
            }
        } else if let Some(length) = find("content-length") {
            let length: usize = length.parse().expect("a numeric Content-Length");
            if rest.len() < length {
                return out;
            }
            body = rest[..length].to_vec();
            rest = &rest[length..];
        } else {
            // Delimited by the close: the rest is its body.
            body = rest.to_vec();
            rest = &[];
        }
        out.push(RawResponse {
            status,
            headers,
            body,
        });
    }
}
