//! Large bodies streamed through the real gateway binary on loopback: what
//! one 2 GB transfer each way costs in memory, time and CPU.
//!
//! An in-process instance makes up the bytes of a download (one shared
//! 64 KiB buffer sent over and over, nothing allocated per chunk) and
//! counts and drops the bytes of an upload; the client does the same on its
//! side. Rows, each with `Content-Length` and with chunked framing, all
//! HTTP/1.1, each on a gateway started for it (so its peak RSS is the
//! row's own):
//!
//! - download, the client reading as fast as it can;
//! - download, the client reading at `BENCH_SLOW_MBPS` (default 50 MB/s):
//!   the gateway must stop reading the instance, not buffer for the client;
//! - upload, the instance reading as fast as it can;
//! - upload, the instance reading at `BENCH_SLOW_MBPS`: the gateway must
//!   stop reading the client, not buffer for the instance.
//!
//! Each prints throughput, the gateway's peak RSS (VmHWM) and its CPU time
//! (user + system) per GB moved. Fast rows move `BENCH_STREAM_MB` (default
//! 2048 MiB); slow rows `BENCH_SLOW_MB` (default 512 MiB, ten seconds at
//! 50 MB/s: far more than any buffer between the two ends, so a gateway
//! that buffered would show it, in a run that stays near a minute).
//!
//!     cargo bench --bench streaming
//!     BENCH_SLOW_MB=2048 cargo bench --bench streaming -- slow
//!
//! A word after `--` runs only the rows whose label holds it.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use support::{GatewayProcess, register_all};

const MIB: u64 = 1 << 20;
/// The piece the instance and the client send over and over.
const PIECE: usize = 64 * 1024;
static PATTERN: [u8; PIECE] = [b'x'; PIECE];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// How a body is delimited on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    Length,
    Chunked,
}

impl Framing {
    fn name(self) -> &'static str {
        match self {
            Self::Length => "content-length",
            Self::Chunked => "chunked",
        }
    }
}

/// `total` bytes of the pattern, made up as they are pulled; with an exact
/// size (so `Content-Length`) or none (so chunked).
struct Generated {
    left: u64,
    framing: Framing,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(PIECE as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&PATTERN[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length => SizeHint::with_exact(self.left),
            Framing::Chunked => SizeHint::default(),
        }
    }
}

/// Reads `body` to its end, at no more than `rate` bytes a second if one is
/// given; returns the bytes read.
async fn drain<B>(body: B, rate: Option<u64>) -> Result<u64, B::Error>
where
    B: Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let started = tokio::time::Instant::now();
    let mut read = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            read += data.len() as u64;
        }
        if let Some(rate) = rate {
            // Ahead of the rate: wait until the bytes read are due.
            let due = started + Duration::from_secs_f64(read as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    Ok(read)
}

/// The instance: `GET /<framing>/<bytes>` answers that many bytes;
/// `POST /<rate>` reads the body (at `rate` bytes a second, 0 for as fast
/// as it can) and answers how many bytes it got.
fn start_instance() -> SocketAddr {
    support::serve_on_own_thread(1, |listener| async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(instance);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })[0]
}

type AnswerBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn instance(
    request: Request<hyper::body::Incoming>,
) -> Result<Response<AnswerBody>, Infallible> {
    let mut parts = request.uri().path().trim_start_matches('/').split('/');
    let (first, second) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let answer = |status: StatusCode, text: String| {
        let mut response = Response::new(
            http_body_util::Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = status;
        response
    };
    if request.method() == http::Method::POST {
        let rate = first.parse().ok().filter(|&r| r > 0);
        return Ok(match drain(request.into_body(), rate).await {
            Ok(read) => answer(StatusCode::OK, read.to_string()),
            Err(e) => answer(StatusCode::BAD_REQUEST, e.to_string()),
        });
    }
    let framing = if first == "chunked" {
        Framing::Chunked
    } else {
        Framing::Length
    };
    let Ok(left) = second.parse::<u64>() else {
        return Ok(answer(StatusCode::NOT_FOUND, "no such size".into()));
    };
    let mut response = Response::new(
        Generated { left, framing }
            .map_err(|never| match never {})
            .boxed(),
    );
    if framing == Framing::Length {
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, left.into());
    }
    Ok(response)
}

/// Which way the bytes go, and who is slow.
#[derive(Clone, Copy)]
enum Direction {
    /// The client reads at this rate (None: as fast as it can).
    Down(Option<u64>),
    /// The instance reads at this rate (None: as fast as it can).
    Up(Option<u64>),
}

/// One transfer through `gateway`; returns the bytes that arrived.
fn transfer(gateway: SocketAddr, direction: Direction, framing: Framing, bytes: u64) -> u64 {
    support::block_on(async move {
        let stream = TcpStream::connect(gateway).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Generated>(TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        let (request, rate) = match direction {
            Direction::Down(rate) => {
                let request = Request::get(format!("/call/stream/{}/{bytes}", framing.name()))
                    .header("host", "bench")
                    .body(Generated {
                        left: 0,
                        framing: Framing::Length,
                    })
                    .expect("request");
                (request, rate)
            }
            Direction::Up(rate) => {
                let mut request = Request::post(format!("/call/stream/{}", rate.unwrap_or(0)))
                    .header("host", "bench");
                request = match framing {
                    Framing::Length => request.header("content-length", bytes),
                    Framing::Chunked => request.header("transfer-encoding", "chunked"),
                };
                let request = request
                    .body(Generated {
                        left: bytes,
                        framing,
                    })
                    .expect("request");
                (request, None)
            }
        };
        let response = sender.send_request(request).await.expect("answered");
        assert_eq!(response.status(), StatusCode::OK, "the transfer failed");
        match direction {
            Direction::Down(_) => drain(response.into_body(), rate)
                .await
                .expect("the whole download"),
            Direction::Up(_) => {
                let text = response
                    .into_body()
                    .collect()
                    .await
                    .expect("the instance's count")
                    .to_bytes();
                String::from_utf8_lossy(&text)
                    .parse()
                    .expect("a byte count")
            }
        }
    })
}

fn main() {
    if support::seconds().is_none() {
        return;
    }
    let only = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let fast_bytes = env_u64("BENCH_STREAM_MB", 2048) * MIB;
    let slow_bytes = env_u64("BENCH_SLOW_MB", 512) * MIB;
    let slow_rate = env_u64("BENCH_SLOW_MBPS", 50) * 1_000_000;
    let instance = start_instance();

    println!(
        "streaming through the gateway over loopback, HTTP/1.1; slow side at {} MB/s",
        slow_rate / 1_000_000
    );
    println!(
        "{:<40} {:>9} {:>9} {:>13} {:>13} {:>11}",
        "row", "MiB", "MB/s", "RSS idle MB", "peak RSS MB", "CPU s/GB"
    );
    for (what, direction, bytes) in [
        ("download, fast client", Direction::Down(None), fast_bytes),
        (
            "download, slow client",
            Direction::Down(Some(slow_rate)),
            slow_bytes,
        ),
        ("upload, fast instance", Direction::Up(None), fast_bytes),
        (
            "upload, slow instance",
            Direction::Up(Some(slow_rate)),
            slow_bytes,
        ),
    ] {
        for framing in [Framing::Length, Framing::Chunked] {
            let label = format!("{what}, {}", framing.name());
            if !label.contains(only.as_str()) {
                continue;
            }
            let gateway = GatewayProcess::start("[health_check]\ninterval = \"0s\"\n");
            register_all(
                gateway.addr,
                vec![("stream".into(), format!("http://{instance}"), "i-0".into())],
                1,
            );
            let (idle, _) = gateway.memory_kib();
            let cpu_before = gateway.cpu_seconds();
            let started = Instant::now();
            let moved = transfer(gateway.addr, direction, framing, bytes);
            let took = started.elapsed().as_secs_f64();
            let cpu = gateway.cpu_seconds() - cpu_before;
            let (_, peak) = gateway.memory_kib();
            assert_eq!(moved, bytes, "{label}: bytes lost");
            let gb = moved as f64 / 1e9;
            println!(
                "{label:<40} {:>9} {:>9.0} {:>13.1} {:>13.1} {:>11.2}",
                moved / MIB,
                moved as f64 / 1e6 / took,
                idle as f64 / 1024.0,
                peak as f64 / 1024.0,
                cpu / gb,
            );
        }
    }
}
