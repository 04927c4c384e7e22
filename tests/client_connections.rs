//! Client connections over raw sockets: keep-alive, pipelining, `HEAD`,
//! `Connection: close`, and a connection that starts with proxied calls and
//! goes on with requests of other kinds, all answered in order. And
//! shutdown: a call in flight is finished, idle connections are closed.

mod common;

use std::time::Duration;

use common::{Echo, Gated, TestGateway, Way, each_way};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

/// One response read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A client connection spoken to byte by byte, and what it has read past
/// the last response.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// A connection that went `way`: new, or past a registry call.
    async fn connect_way(addr: std::net::SocketAddr, way: Way) -> Self {
        Self {
            stream: common::raw_connection(addr, way).await,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends one request and reads its response.
    async fn ask(&mut self, request: &[u8]) -> Raw {
        self.send(request).await;
        self.read(request.starts_with(b"HEAD ")).await
    }

    /// Reads one response (length-delimited or chunked), keeping whatever
    /// follows it; `head` says it answers a `HEAD`.
    async fn read(&mut self, head: bool) -> Raw {
        let (stream, buf) = (&mut self.stream, &mut self.buf);
        let (status, headers, head_len) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(len) =
                parsed.parse(buf).expect("a valid response head")
            {
                let headers = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value).into_owned();
                        (h.name.to_ascii_lowercase(), value)
                    })
                    .collect::<Vec<_>>();
                break (parsed.code.unwrap(), headers, len);
            }
            fill(stream, buf).await;
        };
        buf.drain(..head_len);
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if head || status == 204 || status == 304 {
        } else if find("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            loop {
                let line_end = loop {
                    if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
                        break at;
                    }
                    fill(stream, buf).await;
                };
                let size_line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .expect("a chunk size");
                while buf.len() < line_end + 2 + size + 2 {
                    fill(stream, buf).await;
                }
                body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
                buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            let length: usize = find("content-length")
                .expect("a length-delimited response")
                .parse()
                .unwrap();
            while buf.len() < length {
                fill(stream, buf).await;
            }
            body = buf.drain(..length).collect();
        }
        Raw {
            status,
            headers,
            body,
        }
    }

    /// Whether the gateway closes the connection (rather than waiting for more).
    async fn closes(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 16384];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
        .await
        .expect("an answer within 10 s")
        .expect("a readable connection");
    assert!(n > 0, "the connection closed mid-response");
    buf.extend_from_slice(&chunk[..n]);
}

/// A gateway configured by `toml` with one echo instance behind service
/// `svc`, and a raw client connection to it that went `way`.
async fn echo_behind(toml: &str, way: Way) -> (TestGateway, Echo, RawClient) {
    let gw = TestGateway::start_way(toml, way).await;
    let up = Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    let client = RawClient::connect_way(gw.addr, way).await;
    (gw, up, client)
}

async fn one_connection_serves_calls_and_everything_else_in_order(way: Way) {
    let (_gw, up, mut client) = echo_behind(QUIET, way).await;

    // Two calls pipelined in one write, answered in order.
    client
        .send(
            b"GET /call/svc/one HTTP/1.1\r\nHost: gw\r\n\r\n\
              POST /call/svc/two HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
    let one = client.read(false).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["uri"], "/one");
    assert!(one.header("date").is_some());
    let two = client.read(false).await;
    assert_eq!(two.json()["uri"], "/two");
    assert_eq!(two.json()["method"], "POST");
    assert_eq!(two.json()["body_len"], 5);

    // HEAD: the head only, with the upstream's length.
    let three = client
        .ask(b"HEAD /call/svc/three HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    assert_eq!(three.status, 200);
    assert!(three.header("content-length").is_some());
    assert_eq!(three.header("x-switchyard-upstream"), Some(&*up_id(&up)));

    // The gateway's own error, then a registry read, then a chunked upload:
    // all on the same connection.
    let missing = client
        .ask(b"GET /call/nobody/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    assert_eq!(missing.status, 503);
    assert_eq!(
        missing.header("x-switchyard-error"),
        Some("no_healthy_instance")
    );
    assert_eq!(missing.json()["error"]["code"], "no_healthy_instance");
    let service = client
        .ask(b"GET /services/svc HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    assert_eq!(service.status, 200);
    assert_eq!(service.json()["name"], "svc");
    let four = client
        .ask(
            b"PUT /call/svc/four HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\n",
        )
        .await;
    assert_eq!(four.json()["uri"], "/four");
    assert_eq!(four.json()["body_len"], 3);

    // A call that asks to close gets its answer, then the connection ends.
    let five = client
        .ask(b"GET /call/svc/five HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(five.json()["uri"], "/five");
    assert!(client.buf.is_empty(), "nothing after the last answer");
    assert!(client.closes().await);
    assert_eq!(up.hits(), 5);
}

fn up_id(up: &Echo) -> String {
    up.url().trim_start_matches("http://").to_string()
}

async fn a_call_that_asks_to_close_is_answered_with_connection_close(way: Way) {
    let (_gw, _up, mut client) = echo_behind(QUIET, way).await;
    let reply = client
        .ask(b"GET /call/svc/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(client.closes().await);
}

#[tokio::test]
async fn shutdown_finishes_a_call_in_flight_and_closes_idle_connections() {
    let mut gw = TestGateway::start(QUIET).await;
    let mut slow = Gated::start("finished").await;
    gw.register("svc", &slow.upstream.url()).await;

    let mut idle = RawClient::connect(gw.addr).await;
    let mut busy = RawClient::connect(gw.addr).await;
    busy.send(b"GET /call/svc/slow HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    slow.entered.recv().await.unwrap();

    gw.signal_shutdown();
    let server = gw.take_task();
    assert!(idle.closes().await, "an idle connection is closed at once");
    assert!(!server.is_finished(), "the call in flight holds the server");
    slow.release.notify_one();
    let reply = busy.read(false).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, b"finished");
    assert!(busy.closes().await, "and then its connection closes");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops once the call is done")
        .unwrap();
}

#[tokio::test]
async fn past_the_shutdown_grace_a_call_still_in_flight_is_cut_off() {
    let mut gw =
        TestGateway::start(&format!("[gateway]\nshutdown_grace = \"300ms\"\n{QUIET}")).await;
    // Never released: the call outlives the grace period.
    let mut stuck = Gated::start("never").await;
    gw.register("svc", &stuck.upstream.url()).await;
    let mut busy = RawClient::connect(gw.addr).await;
    busy.send(b"GET /call/svc/stuck HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    stuck.entered.recv().await.unwrap();

    gw.signal_shutdown();
    tokio::time::timeout(Duration::from_secs(10), gw.take_task())
        .await
        .expect("the server stops when the grace period is over")
        .unwrap();
    assert!(busy.closes().await, "the connection is closed");
    assert!(busy.buf.is_empty(), "without an answer");
}

async fn an_idle_connection_closes_header_read_timeout_after_its_last_response(way: Way) {
    let (_gw, _up, mut client) = echo_behind(
        &format!("{QUIET}[limits]\nheader_read_timeout = \"400ms\"\n"),
        way,
    )
    .await;
    let first = client
        .ask(b"GET /call/svc/one HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    assert_eq!(first.status, 200);
    // Idle for most of the timeout, then a second call: the clock starts
    // again from its response, not from the first one's.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let second = client
        .ask(b"GET /call/svc/two HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await;
    assert_eq!(second.status, 200);
    let answered = std::time::Instant::now();
    assert!(client.closes().await, "an idle connection is closed");
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(300), "closed after {idle:?}");
}

// Connection handling of HTTP/1.1 by nature; HTTP/2 multiplexes streams
// and has neither pipelining nor Connection: close.
each_way! {
    ;
    http1:
    one_connection_serves_calls_and_everything_else_in_order,
    a_call_that_asks_to_close_is_answered_with_connection_close,
    an_idle_connection_closes_header_read_timeout_after_its_last_response,
}
