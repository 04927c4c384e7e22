//! Large answers that the gateway splices from the instance's socket to
//! the client's (src/splice.rs), seen from both ends with raw bytes: they
//! arrive whole, in order and framed as the instance framed them; the
//! client's connection and the instance's carry the next request after
//! them; an instance that stops short and a client that vanishes end the
//! exchange without harm to the next one. Answers just under the size
//! that is spliced, and `HEAD`, take the copying path beside them.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{RawResponse, TestGateway, Upstream, Way, each_way, read_until_close, responses};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";
/// The smallest answer that is spliced (`splice::SPLICE_MIN`).
const SPLICE_MIN: usize = 64 * 1024;
/// The pattern repeats every this many bytes: a prime, so a piece lost,
/// doubled or moved shows as a mismatch.
const PERIOD: usize = 65_521;

/// `len` bytes of a seeded pseudo-random pattern.
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let period: Vec<u8> = (0..PERIOD)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    period.iter().copied().cycle().take(len).collect()
}

/// An instance answering `GET /<n>` with `n` bytes of the pattern,
/// framed by `Content-Length`.
async fn instance() -> Upstream {
    Upstream::start(|request: Request<hyper::body::Incoming>| async move {
        let len: usize = request.uri().path()[1..].parse().unwrap_or(0);
        Response::new(Full::new(Bytes::from(pattern(len))))
    })
    .await
}

/// A `GET` of `path` on `gw`, for the caller (h2c).
fn get(gw: &TestGateway, path: &str) -> Request<http_body_util::Empty<Bytes>> {
    Request::get(gw.url(path))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// Sizes each side of the splice threshold, one of many pipefuls, and
/// one larger than the socket buffers between the ends hold.
const SIZES: [usize; 4] = [SPLICE_MIN - 1, SPLICE_MIN, 700_001, 5 << 20];

/// Reads exactly one response to a request for `len` bytes off `stream`.
async fn read_answer(stream: &mut tokio::net::TcpStream, len: usize) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(response) = responses(&buf).pop() {
            assert_eq!(responses(&buf).len(), 1, "one response, nothing after it");
            return response;
        }
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk));
        let n = read
            .await
            .expect("the answer within 10 s")
            .expect("a readable connection");
        assert!(
            n > 0,
            "closed after {} bytes of a {len}-byte answer",
            buf.len()
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Asks for every size in turn, then `HEAD` of a large one, on one
/// connection: each answer is whole and exact, and the connections at both
/// ends are kept for the next.
async fn large_answers_arrive_whole_and_both_connections_carry_the_next(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = instance().await;
    gw.register("big", &up.url()).await;
    if way == Way::H2c {
        for len in SIZES {
            let request = get(&gw, &format!("/call/big/{len}"));
            let response = gw.caller.response(request).await.expect("an answer");
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(body[..] == pattern(len)[..], "{len} bytes over h2c");
        }
        assert_eq!(up.connections(), 1, "one connection to the instance");
        return;
    }
    let mut stream = gw.raw().await;
    for len in SIZES {
        let request = format!("GET /call/big/{len} HTTP/1.1\r\nHost: gw\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, len).await;
        assert_eq!(answer.status, 200, "{len}");
        assert_eq!(answer.header("content-length"), Some(&*len.to_string()));
        assert!(answer.body == pattern(len), "{len} bytes, exact");
    }
    let len = SIZES[3];
    let head = format!("HEAD /call/big/{len} HTTP/1.1\r\nHost: gw\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("the HEAD answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "a head and no body: {text}");
    assert_eq!(up.connections(), 1, "one connection to the instance");
}

/// A client that asks for its connection to close, and an HTTP/1.0 one,
/// get the whole answer and then the end of the stream.
async fn a_closing_connection_ends_right_after_the_whole_answer(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = instance().await;
    gw.register("big", &up.url()).await;
    let len = 700_001;
    for request in [
        format!("GET /call/big/{len} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"),
        format!("GET /call/big/{len} HTTP/1.0\r\nHost: gw\r\n\r\n"),
    ] {
        let mut stream = gw.raw().await;
        stream.write_all(request.as_bytes()).await.unwrap();
        let (bytes, closed) = read_until_close(&mut stream, Duration::from_secs(10)).await;
        assert!(closed, "the gateway closes after the answer");
        let answers = responses(&bytes);
        assert_eq!(answers.len(), 1, "{request:?}");
        assert!(answers[0].body == pattern(len), "{request:?}: exact");
        let head_len = bytes.len() - len;
        assert!(bytes[..head_len].ends_with(b"\r\n\r\n"), "nothing after it");
    }
}

/// An instance that closes its connection short of the length it
/// declared: the client gets what there was and the connection closes,
/// with nothing made up to fill the length; the next call is whole.
async fn an_instance_that_stops_short_cuts_the_answer_off(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sent, declared) = (300_000, 1_000_000);
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let _ = conn.read(&mut head).await;
                let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n");
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.write_all(&pattern(sent)).await;
                // Dropped: the instance closes the connection.
            });
        }
    });
    gw.register("short", &format!("http://{addr}")).await;
    if way == Way::H2c {
        let request = get(&gw, "/call/short/x");
        // The stream is reset, before its head or in its body.
        if let Ok(response) = gw.caller.response(request).await {
            assert!(response.into_body().collect().await.is_err(), "cut off");
        }
        return;
    }
    let mut stream = gw.raw().await;
    stream
        .write_all(b"GET /call/short/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let (bytes, closed) = read_until_close(&mut stream, Duration::from_secs(10)).await;
    assert!(closed, "the connection closes");
    let head_len = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        bytes[head_len..] == pattern(sent)[..],
        "what the instance sent and no more ({} bytes)",
        bytes.len() - head_len
    );
}

/// A client that goes away in the middle of a large answer: the gateway
/// lets go of it and the instance's connection, and the next client gets
/// its answer whole.
async fn a_client_gone_mid_answer_leaves_the_next_one_whole(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = instance().await;
    gw.register("big", &up.url()).await;
    let len = 16 << 20;
    if way == Way::H2c {
        let request = get(&gw, &format!("/call/big/{len}"));
        let response = gw.caller.response(request).await.expect("a head");
        drop(response);
    } else {
        let mut stream = gw.raw().await;
        let request = format!("GET /call/big/{len} HTTP/1.1\r\nHost: gw\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut some = vec![0u8; 100_000];
        stream.read_exact(&mut some).await.unwrap();
        drop(stream);
    }
    let len = 700_001;
    let mut stream = match way {
        Way::H2c => {
            let request = get(&gw, &format!("/call/big/{len}"));
            let response = gw.caller.response(request).await.expect("an answer");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(body[..] == pattern(len)[..]);
            return;
        }
        _ => gw.raw().await,
    };
    let request = format!("GET /call/big/{len} HTTP/1.1\r\nHost: gw\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_answer(&mut stream, len).await;
    assert!(answer.body == pattern(len), "the next answer is exact");
}

/// An instance that sends a forged answer right behind a spliced one, in
/// the same write: the gateway splices only the declared length, and the
/// stray bytes left on that connection never answer the next call (the
/// connection is not reused).
async fn bytes_past_a_spliced_answer_never_answer_the_next_call(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let len = 100_000;
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                while let Ok(n @ 1..) = conn.read(&mut head).await {
                    let reply = if head[..n].starts_with(b"GET /first") {
                        let mut reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n")
                            .into_bytes();
                        reply.extend_from_slice(&pattern(len));
                        reply.extend_from_slice(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!",
                        );
                        reply
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ngood!".to_vec()
                    };
                    if conn.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    gw.register("stray", &format!("http://{addr}")).await;
    if way == Way::H2c {
        for (path, want) in [("first", pattern(len)), ("second", b"good!".to_vec())] {
            let request = get(&gw, &format!("/call/stray/{path}"));
            let response = gw.caller.response(request).await.expect("an answer");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(
                body[..] == want[..],
                "{path}: {:?}",
                &body[..body.len().min(16)]
            );
        }
        return;
    }
    let mut stream = gw.raw().await;
    stream
        .write_all(b"GET /call/stray/first HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut stream, len).await;
    assert!(answer.body == pattern(len), "the declared length, exact");
    stream
        .write_all(b"GET /call/stray/second HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut stream, 5).await;
    assert_eq!(answer.text(), "good!", "not the forged answer");
}

/// Requests for spliced and copied answers pipelined in one write (over
/// h2c, sent at once on one connection): every answer whole, exact and in
/// its place, the socket going from the body that borrowed it to the next
/// answer's writer.
async fn answers_to_pipelined_requests_keep_their_order_across_splices(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = instance().await;
    gw.register("big", &up.url()).await;
    let lens = [700_001, 100, SPLICE_MIN, 5 << 20, SPLICE_MIN - 1];
    if way == Way::H2c {
        let calls = lens.map(|len| {
            let caller = gw.caller.clone();
            let request = get(&gw, &format!("/call/big/{len}"));
            tokio::spawn(async move {
                let response = caller.response(request).await.expect("an answer");
                response.into_body().collect().await.unwrap().to_bytes()
            })
        });
        for (len, call) in lens.into_iter().zip(calls) {
            assert!(call.await.unwrap()[..] == pattern(len)[..], "{len} bytes");
        }
        return;
    }
    let mut requests = String::new();
    for len in lens {
        requests += &format!("GET /call/big/{len} HTTP/1.1\r\nHost: gw\r\n\r\n");
    }
    requests += "GET /call/big/1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    let mut stream = gw.raw().await;
    stream.write_all(requests.as_bytes()).await.unwrap();
    let (read, closed) = read_until_close(&mut stream, Duration::from_secs(20)).await;
    assert!(closed, "Connection: close is honoured");
    let answers = responses(&read);
    assert_eq!(answers.len(), lens.len() + 1, "one answer per request");
    for (answer, len) in answers.iter().zip(lens.into_iter().chain([1])) {
        assert_eq!(answer.status, 200, "{len}");
        assert!(
            answer.body == pattern(len),
            "{len} bytes, exact and in order"
        );
    }
}

each_way! {
    large_answers_arrive_whole_and_both_connections_carry_the_next,
    answers_to_pipelined_requests_keep_their_order_across_splices,
    bytes_past_a_spliced_answer_never_answer_the_next_call,
    an_instance_that_stops_short_cuts_the_answer_off,
    a_client_gone_mid_answer_leaves_the_next_one_whole;
    http1: a_closing_connection_ends_right_after_the_whole_answer,
}
