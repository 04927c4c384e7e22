//! Large bodies streamed through the gateway both ways, each with
//! `Content-Length` and with chunked framing, reaching a reader that
//! takes its time: every byte must arrive, in order, once.
//!
//! The reader pauses now and then (the client on the way down, the
//! instance on the way up), long enough for the socket buffers on the
//! writer's side to fill, so the gateway's writes stall and must resume
//! where they stopped, and it must stop reading the other side meanwhile.
//! The pauses are the slowness under test, not synchronisation: nothing
//! asserted depends on their length. How much memory that takes is
//! measured by `cargo bench --bench streaming`.

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{TestGateway, Way, each_way};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";
/// More than the socket buffers between the two ends hold, so the writer
/// is held back many times over.
const SIZE: u64 = 24 << 20;
/// The pattern repeats every this many bytes: a prime, so no read, write
/// or chunk size lines up with it and a piece lost, doubled or moved
/// shows as a mismatch.
const PERIOD: usize = 65_521;
/// The size of the pieces the writing end sends: not a power of two
/// either, so pieces straddle the gateway's reads.
const PIECE: usize = 50_000;
/// The slow reader pauses after this many bytes...
const PAUSE_EVERY: u64 = 4 << 20;
/// ...for this long.
const PAUSE: Duration = Duration::from_millis(20);

/// Two periods of pseudo-random bytes, so that any `PIECE` starting within
/// the first is one slice.
fn pattern() -> Bytes {
    // xorshift64, seeded: the same bytes on both ends.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut bytes: Vec<u8> = (0..PERIOD)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    bytes.extend_from_within(..);
    bytes.into()
}

/// How a body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Length,
    Chunked,
}

/// `left` bytes of the pattern, sliced off it as they are pulled.
struct Patterned {
    pattern: Bytes,
    sent: u64,
    left: u64,
    framing: Framing,
}

impl Patterned {
    fn new(size: u64, framing: Framing) -> Self {
        Self {
            pattern: pattern(),
            sent: 0,
            left: size,
            framing,
        }
    }
}

impl Body for Patterned {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(PIECE as u64) as usize;
        let at = (self.sent % PERIOD as u64) as usize;
        let piece = self.pattern.slice(at..at + n);
        self.sent += n as u64;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(piece))))
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

/// Reads `body` to its end, slowly, checking every byte against the
/// pattern; returns how many bytes came, or where the first wrong one was.
async fn read_slowly<B>(body: B) -> Result<u64, String>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let pattern = pattern();
    let mut body = std::pin::pin!(body);
    let mut read = 0u64;
    let mut next_pause = PAUSE_EVERY;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the body failed after {read} bytes: {e:?}"))?;
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        while !data.is_empty() {
            let at = (read % PERIOD as u64) as usize;
            let n = data.len().min(PERIOD);
            let piece = data.split_to(n);
            if piece[..] != pattern[at..at + n] {
                return Err(format!("wrong bytes within {read}..{}", read + n as u64));
            }
            read += n as u64;
        }
        if read >= next_pause {
            next_pause += PAUSE_EVERY;
            tokio::time::sleep(PAUSE).await;
        }
    }
    Ok(read)
}

/// The instance: `GET /down/<length|chunked>` answers `SIZE` bytes of the
/// pattern; `POST /up` reads the body slowly and answers `<bytes> bytes`,
/// or 400 with what was wrong.
async fn start_instance() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request| async move {
                    Ok::<_, Infallible>(answer(request).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

type AnyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn answer(request: Request<hyper::body::Incoming>) -> Response<AnyBody> {
    let path = request.uri().path().to_string();
    if path == "/up" {
        let (status, text) = match read_slowly(request.into_body()).await {
            Ok(read) => (StatusCode::OK, format!("{read} bytes")),
            Err(why) => (StatusCode::BAD_REQUEST, why),
        };
        let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
        *response.status_mut() = status;
        return response;
    }
    let framing = if path.ends_with("/chunked") {
        Framing::Chunked
    } else {
        Framing::Length
    };
    let mut response = Response::new(Patterned::new(SIZE, framing).boxed_unsync());
    if framing == Framing::Length {
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, SIZE.into());
    }
    response
}

async fn a_large_download_reaches_a_slow_client_intact(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    gw.register("big", &start_instance().await).await;
    for framing in ["length", "chunked"] {
        let request = Request::get(gw.url(&format!("/call/big/down/{framing}")))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = gw.caller.response(request).await.expect("the head");
        assert_eq!(response.status(), StatusCode::OK, "{framing}");
        let read = read_slowly(response.into_body()).await;
        assert_eq!(read, Ok(SIZE), "{framing}");
    }
}

async fn a_large_upload_reaches_a_slow_instance_intact(way: Way) {
    let gw = TestGateway::start_way(QUIET, way).await;
    gw.register("big", &start_instance().await).await;
    for framing in [Framing::Length, Framing::Chunked] {
        let mut request = Request::post(gw.url("/call/big/up"));
        if framing == Framing::Length {
            request = request.header(http::header::CONTENT_LENGTH, SIZE);
        }
        let request = request.body(Patterned::new(SIZE, framing)).unwrap();
        let reply = gw.send(request).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{framing:?}: {}",
            reply.text()
        );
        assert_eq!(reply.text(), format!("{SIZE} bytes"), "{framing:?}");
    }
}

each_way! {
    a_large_download_reaches_a_slow_client_intact,
    a_large_upload_reaches_a_slow_instance_intact,
}
