//! The gateway's HTTP/1.1 client against scripted upstreams that answer with
//! raw bytes: every way a response can be framed, and connections the
//! upstream closes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{TestGateway, Way, each_way, eventually};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

/// What a scripted upstream does with one request: the bytes to answer
/// with (written in pieces of `chunk` bytes) and whether to close after.
struct Answer {
    bytes: Vec<u8>,
    close: bool,
    chunk: usize,
}

fn answer(bytes: &str) -> Answer {
    Answer {
        bytes: bytes.as_bytes().to_vec(),
        close: false,
        chunk: usize::MAX,
    }
}

/// An upstream that reads each request (head and Content-Length body) and
/// answers as `script` says; counts connections.
struct Scripted {
    url: String,
    connections: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(script: impl Fn(&str) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let (count, script) = (connections.clone(), Arc::new(script));
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(head_end) = read_head(&mut stream, &mut buf).await else {
                            return;
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        while buf.len() < head_end + 4 + length {
                            let mut more = [0u8; 8192];
                            match stream.read(&mut more).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&more[..n]),
                            }
                        }
                        buf.drain(..head_end + 4 + length);
                        let reply = script(&head);
                        for piece in reply.bytes.chunks(reply.chunk.max(1)) {
                            if stream.write_all(piece).await.is_err() {
                                return;
                            }
                            if reply.chunk != usize::MAX {
                                tokio::task::yield_now().await;
                            }
                        }
                        if reply.close {
                            let _ = stream.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        Self { url, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn read_head(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end);
        }
        let mut more = [0u8; 8192];
        match stream.read(&mut more).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&more[..n]),
        }
    }
}

async fn chunked_responses_are_decoded_with_extensions_and_trailers(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|_| Answer {
        chunk: 3,
        ..answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Checksum: 1\r\n\r\n")
    })
    .await;
    gw.register("svc", &up.url).await;
    for _ in 0..3 {
        let reply = gw.get("/call/svc/x").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "hello world");
    }
    assert_eq!(up.connections(), 1, "reused after each chunked body");
}

async fn a_response_with_both_framing_headers_is_read_by_chunks_and_its_connection_dropped(
    way: Way,
) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|_| {
        answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 999\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    })
    .await;
    gw.register("svc", &up.url).await;
    for _ in 0..2 {
        let reply = gw.get("/call/svc/x").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), "hello");
        assert_ne!(
            reply.header("content-length"),
            Some("999"),
            "the framing is the gateway's"
        );
    }
    // RFC 9112 §6.3: such a message may be an attempt at response splitting.
    assert_eq!(up.connections(), 2, "never reused");
}

async fn bodiless_responses_keep_the_connection(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|head| {
        if head.starts_with("HEAD") {
            answer("HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Kind: head\r\n\r\n")
        } else if head.contains("/nothing") {
            answer("HTTP/1.1 204 No Content\r\n\r\n")
        } else if head.contains("/same") {
            answer("HTTP/1.1 304 Not Modified\r\nETag: \"1\"\r\n\r\n")
        } else {
            answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        }
    })
    .await;
    gw.register("svc", &up.url).await;
    for _ in 0..3 {
        let reply = gw.request(Method::HEAD, "/call/svc/x", "", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("content-length"), Some("100"));
        assert!(reply.body.is_empty());
        assert_eq!(
            gw.get("/call/svc/nothing").await.status,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            gw.get("/call/svc/same").await.status,
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(gw.get("/call/svc/body").await.text(), "ok");
    }
    assert_eq!(up.connections(), 1);
}

async fn close_delimited_and_http10_responses_are_read_to_the_end_and_not_reused(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|head| Answer {
        close: true,
        chunk: 4,
        ..if head.contains("/old") {
            answer("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nolder")
        } else {
            answer("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the very end")
        }
    })
    .await;
    gw.register("svc", &up.url).await;
    assert_eq!(gw.get("/call/svc/x").await.text(), "until the very end");
    assert_eq!(gw.get("/call/svc/old").await.text(), "older");
    assert_eq!(gw.get("/call/svc/x").await.text(), "until the very end");
    assert_eq!(up.connections(), 3);
}

/// Bodies larger than one read, in every framing, written by the instance
/// in pieces that end nowhere in particular: long chunks and short ones,
/// a length, the end of the connection. Every byte arrives, in order.
async fn large_bodies_in_every_framing_arrive_byte_for_byte(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let wire = {
        let body = body.clone();
        move |head: &str| {
            let mut bytes = Vec::new();
            if head.contains("/chunked") {
                bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                // Chunks longer than a read, then short ones.
                for part in body[..280_000]
                    .chunks(70_000)
                    .chain(body[280_000..].chunks(900))
                {
                    bytes.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    bytes.extend_from_slice(part);
                    bytes.extend_from_slice(b"\r\n");
                }
                bytes.extend_from_slice(b"0\r\n\r\n");
            } else if head.contains("/length") {
                bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n");
                bytes.extend_from_slice(&body);
            } else {
                bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
                bytes.extend_from_slice(&body);
            }
            Answer {
                bytes,
                close: head.contains("/close"),
                chunk: 10_007,
            }
        }
    };
    let up = Scripted::start(wire).await;
    gw.register("svc", &up.url).await;
    for framing in ["chunked", "length", "close", "length"] {
        let reply = gw.get(&format!("/call/svc/{framing}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{framing}");
        assert!(reply.body[..] == body[..], "{framing}: the body differs");
    }
    // The length-framed and chunked answers left their connection reusable.
    assert_eq!(up.connections(), 2);
}

async fn an_upload_of_small_and_large_chunks_arrives_byte_for_byte(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    // The instance answers with the body it received.
    let up = common::Upstream::start(|request: http::Request<hyper::body::Incoming>| async move {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        common::response(200, body)
    })
    .await;
    gw.register("svc", &up.url()).await;
    // A known length under 64 KiB goes out with the request head in one
    // write: small chunks copied behind it, large ones placed between
    // them. Over HTTP/2 the chunks arrive as they were sent (up to a
    // frame's 16 KiB); over HTTP/1 the head's 5 000 bytes of padding leave
    // less than 4 KiB of body in the gateway's first read.
    let sizes = [1_000, 10_000, 300, 20_000, 2_000, 30_000, 10];
    let body: Vec<u8> = (0..sizes.iter().sum::<usize>() as u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let (feed, piped) = common::piped();
    let mut at = 0;
    for size in sizes {
        feed.send(bytes::Bytes::copy_from_slice(&body[at..at + size]));
        at += size;
    }
    feed.finish();
    let request = http::Request::post(gw.url("/call/svc/upload"))
        .header("content-length", body.len())
        .header("x-padding", "p".repeat(5_000))
        .body(piped)
        .unwrap();
    let reply = gw.send(request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body[..] == body[..], "the body differs");
}

/// An answer whose small and large chunks are all there at once goes out
/// in one write: the large ones in place between the small ones.
async fn an_answer_of_small_and_large_chunks_arrives_byte_for_byte(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let sizes = [100, 10_000, 200, 20_000, 3];
    let body: Vec<u8> = (0..sizes.iter().sum::<usize>() as u32)
        .map(|i| (i * 13 % 251) as u8)
        .collect();
    let wire = {
        let body = body.clone();
        move |_: &str| {
            let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            let mut at = 0;
            for size in sizes {
                bytes.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                bytes.extend_from_slice(&body[at..at + size]);
                bytes.extend_from_slice(b"\r\n");
                at += size;
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
            Answer {
                bytes,
                close: false,
                chunk: usize::MAX,
            }
        }
    };
    let up = Scripted::start(wire).await;
    gw.register("svc", &up.url).await;
    // Twice: on a fresh instance connection, then on the kept one.
    for _ in 0..2 {
        let reply = gw.get("/call/svc/mixed").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body[..] == body[..], "the body differs");
    }
    assert_eq!(up.connections(), 1);
}

async fn interim_responses_are_skipped(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|_| {
        answer("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
    })
    .await;
    gw.register("svc", &up.url).await;
    let reply = gw.request(Method::POST, "/call/svc/x", "data", &[]).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.text(), "done");
}

async fn broken_framing_from_an_upstream_is_a_502(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    for bad in [
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        "HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nabc",
        "HTTP/1.1 2000 Odd\r\n\r\n",
        "garbage\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let up = Scripted::start(move |_| Answer {
            close: true,
            ..answer(bad)
        })
        .await;
        gw.register("svc", &up.url).await;
        let reply = gw.request(Method::POST, "/call/svc/x", "", &[]).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{bad:?}");
        assert_eq!(reply.error_code(), "upstream_error", "{bad:?}");
        gw.delete("/services/svc").await;
    }
}

async fn a_response_cut_short_is_an_error_for_the_client(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|_| Answer {
        close: true,
        ..answer("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
    })
    .await;
    gw.register("svc", &up.url).await;
    // The client must never take the truncated body for a whole one: the
    // exchange breaks, before the head or inside the body.
    assert!(!arrives_whole(&gw, "/call/svc/x").await);
}

/// Whether a GET of `path` gets a response whose body ends as its framing
/// says, rather than an error before the head or inside the body.
async fn arrives_whole(gw: &TestGateway, path: &str) -> bool {
    let request = http::Request::get(gw.url(path))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    match gw.caller.response(request).await {
        Ok(response) => response.into_body().collect().await.is_ok(),
        Err(_) => false,
    }
}

/// The same for a body larger than one read, cut inside its data: by a
/// length and inside a long chunk.
async fn a_large_response_cut_short_is_an_error_for_the_client(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|head| {
        let mut bytes = if head.contains("/chunked") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11170\r\n".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n".to_vec()
        };
        bytes.extend(std::iter::repeat_n(b'x', 30_000));
        Answer {
            bytes,
            close: true,
            chunk: 10_007,
        }
    })
    .await;
    gw.register("svc", &up.url).await;
    for framing in ["length", "chunked"] {
        let whole = arrives_whole(&gw, &format!("/call/svc/{framing}")).await;
        assert!(!whole, "{framing}");
    }
}

async fn an_idle_connection_the_upstream_closed_is_not_used(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    // Answers keep-alive, then closes the idle connection soon after.
    let up = Scripted::start(|_| Answer {
        close: true,
        ..answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    })
    .await;
    gw.register("svc", &up.url).await;
    let service = gw.gateway.registry().get("svc").unwrap();
    let pool = service.instances()[0].pool().clone();
    for _ in 0..10 {
        // A POST is never retried: it must not be sent on a dead connection.
        let reply = gw
            .request(Method::POST, "/call/svc/x", "payload", &[])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        // The connection went back to the pool and the upstream closes it:
        // wait until the gateway has seen that, then go again.
        eventually(
            Duration::from_secs(5),
            "the closed connection noticed",
            || {
                let pool = pool.clone();
                async move {
                    pool.prune();
                    pool.idle_count() == 0
                }
            },
        )
        .await;
    }
    assert_eq!(up.connections(), 10);
}

async fn an_early_answer_to_a_large_upload_is_passed_back(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    // Answers 413 after the head and closes without reading the body.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_head(&mut stream, &mut buf).await.is_some() {
                    let _ = stream
                        .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
                        .await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    gw.register("svc", &url).await;
    let big = vec![b'x'; 8 << 20];
    let request = http::Request::post(gw.url("/call/svc/upload"))
        .body(http_body_util::Full::new(bytes::Bytes::from(big)))
        .unwrap();
    let reply = gw.send(request).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.text(), "too big!");
}

// ----- framing the gateway must not pass on -----

async fn a_content_length_with_a_sign_is_a_broken_response(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|_| Answer {
        close: true,
        ..answer("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello")
    })
    .await;
    gw.register("svc", &up.url).await;
    let reply = gw.request(Method::POST, "/call/svc/x", "", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.error_code(), "upstream_error");
}

async fn a_chunk_size_with_a_sign_never_reaches_the_client_whole(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|_| Answer {
        close: true,
        ..answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n")
    })
    .await;
    gw.register("svc", &up.url).await;
    let request = http::Request::post(gw.url("/call/svc/x"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    // Either the gateway saw it before answering (502), or the client's
    // exchange breaks inside the body: never a whole 200.
    match gw.caller.response(request).await {
        Err(_) => {}
        Ok(response) if response.status() == StatusCode::BAD_GATEWAY => {
            assert_eq!(
                response
                    .headers()
                    .get("x-switchyard-error")
                    .and_then(|v| v.to_str().ok()),
                Some("upstream_error")
            );
        }
        Ok(response) => {
            let status = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body()).await;
            assert!(
                body.is_err(),
                "a whole {status} passed on: {:?}",
                body.map(|b| b.to_bytes())
            );
        }
    }
}

// ----- bodiless answers -----

async fn head_answers_carry_the_upstream_length_or_none(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|head| {
        if head.contains("/nolength") {
            answer("HTTP/1.1 200 OK\r\nX-Kind: nolength\r\n\r\n")
        } else if head.contains("/chunked") {
            answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n")
        } else {
            answer("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Kind: sized\r\n\r\n")
        }
    })
    .await;
    gw.register("svc", &up.url).await;
    for (path, length) in [
        ("/call/svc/nolength", None),
        ("/call/svc/chunked", None),
        ("/call/svc/sized", Some("1234")),
    ] {
        let reply = gw.request(Method::HEAD, path, "", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert!(
            reply.header("x-kind").is_some(),
            "{path}: the upstream's head"
        );
        assert_eq!(
            reply.header("content-length"),
            length,
            "{path}: {:?}",
            reply.headers
        );
        assert!(reply.body.is_empty(), "{path}");
    }
}

async fn a_204_reaches_the_client_without_content_length(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Scripted::start(|head| {
        if head.contains("/zero") {
            answer("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        } else if head.contains("/five") {
            // A 204 has no body whatever its Content-Length says.
            answer("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
        } else {
            answer("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        }
    })
    .await;
    gw.register("svc", &up.url).await;
    for path in ["/call/svc/zero", "/call/svc/five"] {
        let reply = gw.get(path).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{path}");
        assert_eq!(
            reply.header("content-length"),
            None,
            "{path}: {:?}",
            reply.headers
        );
        assert!(reply.body.is_empty());
        // The upstream connection is still in step.
        assert_eq!(gw.get("/call/svc/after").await.text(), "ok", "{path}");
    }
}

// ----- stalls after the response head ([proxy] idle_timeout) -----

const IDLE: &str = "[health_check]\ninterval = \"0s\"\n[proxy]\nidle_timeout = \"500ms\"\n";

/// An upstream that answers every request's head with `head` and `sent`
/// (a start of the body), then sends nothing more; reports on `closed`
/// when the gateway closes that connection.
async fn stalling(
    head: &'static str,
    sent: &'static [u8],
) -> (String, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_head(&mut stream, &mut buf).await.is_none() {
                    return;
                }
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(sent).await;
                let mut more = [0u8; 1024];
                while let Ok(n) = stream.read(&mut more).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tx.send(());
            });
        }
    });
    (url, closed)
}

async fn a_response_body_that_stalls_is_cut_off_after_idle_timeout(way: Way) {
    stalled_body_is_cut_off(
        way,
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        b"123456789",
    )
    .await;
}

/// The same with an answer large enough to be spliced from socket to
/// socket (src/splice.rs): its idle timeout holds as well.
async fn a_spliced_response_body_that_stalls_is_cut_off_after_idle_timeout(way: Way) {
    static SENT: [u8; 100_000] = [b'x'; 100_000];
    stalled_body_is_cut_off(
        way,
        "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n",
        &SENT,
    )
    .await;
}

/// An instance answers `head` and `sent` then goes silent: the client's
/// body ends in an error once `idle_timeout` has passed, and the
/// instance's connection is closed.
async fn stalled_body_is_cut_off(way: Way, head: &'static str, sent: &'static [u8]) {
    let gw = TestGateway::start_way(IDLE, way).await;
    let (url, mut closed) = stalling(head, sent).await;
    gw.register("svc", &url).await;
    let started = Instant::now();
    let request = http::Request::get(gw.url("/call/svc/x"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = gw.caller.response(request).await.expect("the head");
    assert_eq!(response.status(), StatusCode::OK);
    // HTTP/1: the connection closes short of the promised length; h2: the
    // stream is reset. Either way the body ends in an error.
    let body = tokio::time::timeout(
        Duration::from_secs(10),
        http_body_util::BodyExt::collect(response.into_body()),
    )
    .await
    .expect("the stalled body ends within 10 s");
    assert!(body.is_err(), "a cut-off body passed for a whole one");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    tokio::time::timeout(Duration::from_secs(10), closed.recv())
        .await
        .expect("the upstream connection closed within 10 s");
}

async fn a_client_that_never_reads_cannot_hold_an_upstream_connection(way: Way) {
    let gw = TestGateway::start_way(IDLE, way).await;
    // 64 MB: more than every socket buffer between the two can hold, so the
    // upstream is still writing when the client's stall begins.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut released) = mpsc::unbounded_channel::<&'static str>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_head(&mut stream, &mut buf).await.is_none() {
                    return;
                }
                const SIZE: usize = 64 << 20;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n");
                if stream.write_all(head.as_bytes()).await.is_err() {
                    let _ = tx.send("write failed");
                    return;
                }
                let piece = vec![b'x'; 64 * 1024];
                for _ in 0..SIZE / piece.len() {
                    if stream.write_all(&piece).await.is_err() {
                        let _ = tx.send("write failed");
                        return;
                    }
                }
                // All written (it should not fit): wait for the close.
                let mut more = [0u8; 1024];
                while let Ok(n) = stream.read(&mut more).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tx.send("eof after the whole body");
            });
        }
    });
    gw.register("svc", &url).await;
    // The request goes out; the response is never read.
    let _held = if way.is_http1() {
        let mut stream = gw.raw().await;
        stream
            .write_all(b"GET /call/svc/big HTTP/1.1\r\nHost: gw\r\n\r\n")
            .await
            .unwrap();
        Box::new(stream) as Box<dyn std::any::Any + Send>
    } else {
        let mut sender = common::h2_connection(gw.addr).await;
        let request = http::Request::get("http://gw/call/svc/big")
            .body(common::AnyBody::new(
                http_body_util::Empty::new().map_err(|never| match never {}),
            ))
            .unwrap();
        let response = sender.send_request(request).await.expect("the head");
        assert_eq!(response.status(), StatusCode::OK);
        Box::new((sender, response)) as Box<dyn std::any::Any + Send>
    };
    let how = tokio::time::timeout(Duration::from_secs(15), released.recv())
        .await
        .expect("the gateway let the upstream connection go within 15 s");
    assert!(how.is_some());
}

each_way! {
    chunked_responses_are_decoded_with_extensions_and_trailers,
    a_response_with_both_framing_headers_is_read_by_chunks_and_its_connection_dropped,
    bodiless_responses_keep_the_connection,
    close_delimited_and_http10_responses_are_read_to_the_end_and_not_reused,
    large_bodies_in_every_framing_arrive_byte_for_byte,
    an_upload_of_small_and_large_chunks_arrives_byte_for_byte,
    an_answer_of_small_and_large_chunks_arrives_byte_for_byte,
    interim_responses_are_skipped,
    broken_framing_from_an_upstream_is_a_502,
    a_response_cut_short_is_an_error_for_the_client,
    a_large_response_cut_short_is_an_error_for_the_client,
    an_idle_connection_the_upstream_closed_is_not_used,
    an_early_answer_to_a_large_upload_is_passed_back,
    a_content_length_with_a_sign_is_a_broken_response,
    a_chunk_size_with_a_sign_never_reaches_the_client_whole,
    head_answers_carry_the_upstream_length_or_none,
    a_204_reaches_the_client_without_content_length,
    a_response_body_that_stalls_is_cut_off_after_idle_timeout,
    a_spliced_response_body_that_stalls_is_cut_off_after_idle_timeout,
    a_client_that_never_reads_cannot_hold_an_upstream_connection,
}
