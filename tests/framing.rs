//! HTTP/1 request framing end to end (SPEC §6): raw bytes on a socket,
//! written on a fresh connection and on one that has already carried a
//! registry call, since the two can reach different parsers. What must
//! hold: a request whose framing is ambiguous is refused with one 400 and
//! the connection closed, and nothing it carries reaches an upstream; the
//! requests around it keep their own answers, in order.
//!
//! HTTP/2 does not apply here: it frames every body itself and has no
//! Transfer-Encoding, no bare line endings and no Host field of its own.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{RawResponse, TestGateway, Upstream, Way, each_way, read_until_close, responses};
use serde_json::json;
use tokio::io::AsyncWriteExt;

const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

/// An upstream that answers 200 `ok` and records the target of every
/// request whose head reached it.
struct Recorder {
    upstream: Upstream,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let upstream = Upstream::start(move |request| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(request.uri().to_string());
                let _ = http_body_util::BodyExt::collect(request.into_body()).await;
                common::response(200, "ok")
            }
        })
        .await;
        Self { upstream, seen }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// A gateway going `way` with a recording instance behind service `svc`.
async fn gateway(way: Way) -> (TestGateway, Recorder) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = Recorder::start().await;
    gw.register("svc", &up.upstream.url()).await;
    (gw, up)
}

/// Writes `bytes` in one go on a connection that went `gw`'s way and reads
/// until the gateway closes it (at most 10 s). Returns the responses and
/// whether it closed.
async fn exchange(gw: &TestGateway, bytes: &[u8]) -> (Vec<RawResponse>, bool, String) {
    let mut stream = gw.raw().await;
    stream.write_all(bytes).await.unwrap();
    let (read, closed) = read_until_close(&mut stream, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&read).into_owned();
    (responses(&read), closed, text)
}

fn assert_bad_request(response: &RawResponse, raw: &str) {
    assert_eq!(response.status, 400, "{raw}");
    assert_eq!(
        response.header("x-switchyard-error"),
        Some("bad_request"),
        "{raw}"
    );
    assert_eq!(response.error_code(), "bad_request", "{raw}");
}

// ----- both framing headers, with bare LF line endings -----

/// The head's lines end in a bare LF; the chunked reading (a chunk of 0x12
/// bytes that hides a Content-Length line) differs from the
/// Content-Length one (5 bytes). Whoever reads it as what it is not would
/// forward something else than was meant.
const BARE_LF_CL_TE: &[u8] = b"POST /call/svc/single HTTP/1.1\nHost: gw\nContent-Length: 5\nTransfer-Encoding: chunked\n\n12\r\nContent-Length: z\n\r\n0\r\n\r\n";

/// A CRLF request with both framing headers, to follow another request.
const CL_TE: &[u8] = b"POST /call/svc/smuggled HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

async fn a_bare_lf_head_with_both_framing_headers_gets_one_400_and_is_not_forwarded(way: Way) {
    let (gw, up) = gateway(way).await;
    let (answers, closed, raw) = exchange(&gw, BARE_LF_CL_TE).await;
    assert_eq!(answers.len(), 1, "one response only: {raw}");
    assert_bad_request(&answers[0], &raw);
    assert!(closed, "the connection is closed after it");
    assert_eq!(up.seen(), Vec::<String>::new(), "nothing was forwarded");
}

async fn both_framing_headers_after_a_bare_lf_request_with_a_small_body_are_refused(way: Way) {
    let (gw, up) = gateway(way).await;
    let mut bytes = b"GET /healthz HTTP/1.1\nHost: gw\nContent-Length: 3\n\nabc".to_vec();
    bytes.extend_from_slice(CL_TE);
    let (answers, closed, raw) = exchange(&gw, &bytes).await;
    assert!(
        !up.seen().iter().any(|t| t.contains("smuggled")),
        "forwarded: {:?}\n{raw}",
        up.seen()
    );
    let last = answers.last().unwrap_or_else(|| panic!("no answer: {raw}"));
    assert_bad_request(last, &raw);
    assert!(closed, "{raw}");
}

async fn both_framing_headers_after_a_bare_lf_upload_of_70000_bytes_are_refused(way: Way) {
    let (gw, up) = gateway(way).await;
    let mut bytes = b"POST /call/svc/upload HTTP/1.1\nHost: gw\nContent-Length: 70000\n\n".to_vec();
    bytes.extend(std::iter::repeat_n(b'x', 70_000));
    bytes.extend_from_slice(CL_TE);
    let (answers, closed, raw) = exchange(&gw, &bytes).await;
    assert!(
        !up.seen().iter().any(|t| t.contains("smuggled")),
        "forwarded: {:?}",
        up.seen()
    );
    let last = answers.last().unwrap_or_else(|| panic!("no answer: {raw}"));
    assert_bad_request(last, &raw);
    assert!(closed, "{raw}");
}

async fn both_framing_headers_after_a_trailer_section_ended_by_a_bare_lf_are_refused(way: Way) {
    let (gw, up) = gateway(way).await;
    let mut bytes = b"POST /call/svc/chunked HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\n".to_vec();
    bytes.extend_from_slice(CL_TE);
    let (answers, closed, raw) = exchange(&gw, &bytes).await;
    assert!(
        !up.seen().iter().any(|t| t.contains("smuggled")),
        "forwarded: {:?}",
        up.seen()
    );
    let last = answers.last().unwrap_or_else(|| panic!("no answer: {raw}"));
    assert_bad_request(last, &raw);
    assert!(closed, "{raw}");
}

async fn a_bare_lf_get_keeps_its_answer_and_the_next_request_gets_the_400(way: Way) {
    let (gw, up) = gateway(way).await;
    let mut bytes = b"GET /healthz HTTP/1.1\nHost: gw\n\n".to_vec();
    bytes.extend_from_slice(CL_TE);
    let (answers, closed, raw) = exchange(&gw, &bytes).await;
    assert_eq!(answers.len(), 2, "{raw}");
    assert_eq!(answers[0].status, 200, "the GET first: {raw}");
    assert_eq!(answers[0].json(), json!({"status": "ok"}));
    assert_bad_request(&answers[1], &raw);
    assert!(closed, "{raw}");
    assert_eq!(up.seen(), Vec::<String>::new());
}

// ----- Host -----

async fn an_http1_1_request_without_exactly_one_host_gets_400(way: Way) {
    let (gw, up) = gateway(way).await;
    let register = json!({"name": "other", "url": "http://127.0.0.1:9"}).to_string();
    let register = |host: &str| {
        format!(
            "POST /services HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{register}",
            register.len()
        )
    };
    for request in [
        "GET /call/svc/nohost HTTP/1.1\r\n\r\n".to_string(),
        "GET /call/svc/twohosts HTTP/1.1\r\nHost: gw\r\nHost: evil.example\r\n\r\n".to_string(),
        "GET /services HTTP/1.1\r\n\r\n".to_string(),
        "GET /services HTTP/1.1\r\nHost: gw\r\nHost: gw\r\n\r\n".to_string(),
        register(""),
        register("Host: a\r\nHost: b\r\n"),
    ] {
        let (answers, _, raw) = exchange(&gw, request.as_bytes()).await;
        let first = answers
            .first()
            .unwrap_or_else(|| panic!("{request:?}: no answer: {raw}"));
        assert_eq!(first.status, 400, "{request:?}: {raw}");
        first.error_code();
    }
    assert_eq!(up.seen(), Vec::<String>::new(), "nothing was forwarded");
    assert_eq!(
        gw.get("/services/other").await.status,
        http::StatusCode::NOT_FOUND,
        "nothing was registered"
    );
    // HTTP/1.0 has no Host requirement.
    let (answers, _, raw) = exchange(&gw, b"GET /call/svc/old HTTP/1.0\r\n\r\n").await;
    assert_eq!(answers.first().map(|a| a.status), Some(200), "{raw}");
    assert_eq!(up.seen(), ["/old"]);
}

// ----- Content-Length -----

async fn a_content_length_past_any_size_gets_400_not_431(way: Way) {
    let (gw, up) = gateway(way).await;
    for target in ["/call/svc/huge", "/services"] {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 18446744073709551615\r\n\r\n{{}}"
        );
        let (answers, closed, raw) = exchange(&gw, request.as_bytes()).await;
        let first = answers
            .first()
            .unwrap_or_else(|| panic!("{target}: no answer: {raw}"));
        assert_eq!(first.status, 400, "{target}: {raw}");
        assert_eq!(first.error_code(), "bad_request", "{target}");
        assert!(closed, "{target}: {raw}");
    }
    assert_eq!(up.seen(), Vec::<String>::new());
}

// ----- pipelining and 100-continue -----

async fn pipelined_calls_and_a_registry_call_are_answered_in_order(way: Way) {
    let (gw, up) = gateway(way).await;
    let mut stream = gw.raw().await;
    stream
        .write_all(
            b"GET /call/svc/one HTTP/1.1\r\nHost: gw\r\n\r\n\
              POST /call/svc/two HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello\
              GET /services HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let (read, closed) = read_until_close(&mut stream, Duration::from_secs(10)).await;
    let raw = String::from_utf8_lossy(&read).into_owned();
    let answers = responses(&read);
    assert_eq!(answers.len(), 3, "{raw}");
    assert_eq!(answers[0].status, 200);
    assert_eq!(answers[0].text(), "ok");
    assert_eq!(answers[1].status, 200);
    assert_eq!(answers[1].text(), "ok");
    assert_eq!(answers[2].status, 200);
    assert_eq!(answers[2].json()[0]["name"], "svc", "{raw}");
    assert!(closed, "Connection: close is honoured");
    assert_eq!(up.seen(), ["/one", "/two"]);
}

async fn an_upload_that_expects_100_continue_gets_it_then_the_answer(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    let up = common::Echo::start("a").await;
    gw.register("svc", &up.url()).await;
    let mut stream = gw.raw().await;
    stream
        .write_all(
            b"POST /call/svc/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    // The body goes only once the gateway asks for it.
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    while !read.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
        )
        .await
        .expect("100 Continue within 10 s")
        .unwrap();
        assert!(n > 0, "closed before 100 Continue");
        read.extend_from_slice(&buf[..n]);
    }
    let interim = responses(&read);
    assert_eq!(
        interim.first().map(|r| r.status),
        Some(100),
        "{}",
        String::from_utf8_lossy(&read)
    );
    stream.write_all(b"hello").await.unwrap();
    let (rest, _) = read_until_close(&mut stream, Duration::from_secs(10)).await;
    read.extend_from_slice(&rest);
    let answers = responses(&read);
    let raw = String::from_utf8_lossy(&read).into_owned();
    assert_eq!(answers.len(), 2, "{raw}");
    assert_eq!(answers[1].status, 200, "{raw}");
    assert_eq!(answers[1].json()["body_len"], 5);
    assert_eq!(up.hits(), 1);
}

each_way! {
    ;
    http1:
    a_bare_lf_head_with_both_framing_headers_gets_one_400_and_is_not_forwarded,
    both_framing_headers_after_a_bare_lf_request_with_a_small_body_are_refused,
    both_framing_headers_after_a_bare_lf_upload_of_70000_bytes_are_refused,
    both_framing_headers_after_a_trailer_section_ended_by_a_bare_lf_are_refused,
    a_bare_lf_get_keeps_its_answer_and_the_next_request_gets_the_400,
    an_http1_1_request_without_exactly_one_host_gets_400,
    a_content_length_past_any_size_gets_400_not_431,
    pipelined_calls_and_a_registry_call_are_answered_in_order,
    an_upload_that_expects_100_continue_gets_it_then_the_answer,
}
