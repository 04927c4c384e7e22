//! HTTP/2 with prior knowledge, served by hyper: the HTTP/1 server hands
//! over a connection whose first bytes are the HTTP/2 preface, with those
//! bytes, and hyper calls the same stack for every stream.
//!
//! hyper drives each response body as HTTP/2 flow control allows: when a
//! client stops reading, hyper stops polling the body, so no timer inside
//! the body could fire. A watchdog task per response ([`Watched`]) takes
//! the body away once it has made no progress for `idle_timeout`, which
//! closes the instance's connection under it; the stream then ends with
//! an error the next time hyper looks.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, header};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::Service;

use super::Client;
use crate::body::{self, Body, BoxError};

/// Serves the HTTP/2 connection `stream`, whose first bytes, already read,
/// are `read`.
pub async fn serve(client: &Client, stream: TcpStream, read: BytesMut) -> Result<(), BoxError> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(client.gateway.config().limits.max_header_bytes);
    let stack = client.stack.clone();
    let gateway = client.gateway.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let mut stack = stack.clone();
        let idle = gateway.config().proxy.idle_timeout;
        async move {
            let head = request.method() == Method::HEAD;
            let request = request.map(body::boxed);
            let response = match stack.call(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(match head {
                true => head_only(response),
                false => response.map(|body| watch(body, idle)),
            })
        }
    });
    let io = TokioIo::new(Rewound {
        inner: stream,
        read: read.freeze(),
    });
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        done = connection.as_mut() => return Ok(done?),
        () = client.draining.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    Ok(connection.await?)
}

/// The answer to a HEAD: `response`'s head, with the `Content-Length` its
/// body would have had, and no body. The gateway's own answers (the API,
/// the status page, `/metrics`) are built the same for GET and HEAD, and
/// HTTP/2, unlike the HTTP/1 server, does not drop a HEAD's body itself:
/// DATA on a HEAD's stream is a protocol error to the client. A body that
/// is already over (an instance's answer to HEAD) is left as it is.
fn head_only(response: Response<Body>) -> Response<Body> {
    if http_body::Body::is_end_stream(response.body()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    if let Some(length) = http_body::Body::size_hint(&body).exact() {
        parts
            .headers
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(length));
    }
    Response::from_parts(parts, body::empty())
}

/// `body`, taken away once it makes no progress for `idle`.
fn watch(body: Body, idle: Duration) -> Body {
    if http_body::Body::is_end_stream(&body) {
        return body;
    }
    let epoch = Instant::now();
    let watched = Watched {
        body: Arc::new(Mutex::new(Held {
            body: Some(body),
            waker: None,
        })),
        progress: Arc::new(AtomicU64::new(0)),
        epoch,
    };
    let (weak, progress) = (Arc::downgrade(&watched.body), watched.progress.clone());
    tokio::spawn(watchdog(weak, progress, epoch, idle));
    body::boxed(watched)
}

/// Drops the body behind `weak` once `progress` (milliseconds since
/// `epoch`) has not moved for `idle`, and wakes whoever waits on it;
/// ends when the body is gone.
async fn watchdog(
    weak: Weak<Mutex<Held>>,
    progress: Arc<AtomicU64>,
    epoch: Instant,
    idle: Duration,
) {
    loop {
        let last = epoch + Duration::from_millis(progress.load(Ordering::Relaxed));
        tokio::time::sleep_until(last + idle).await;
        let Some(held) = weak.upgrade() else {
            return;
        };
        let last = epoch + Duration::from_millis(progress.load(Ordering::Relaxed));
        if last + idle <= Instant::now() {
            tracing::debug!("response body made no progress for idle_timeout: dropped");
            let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
            held.body = None;
            if let Some(waker) = held.waker.take() {
                waker.wake();
            }
            return;
        }
    }
}

/// The body a watchdog may take away, and the waker of its reader.
struct Held {
    body: Option<Body>,
    waker: Option<std::task::Waker>,
}

/// A response body whose progress a watchdog follows.
struct Watched {
    body: Arc<Mutex<Held>>,
    /// When the body last gave a frame, in milliseconds since `epoch`.
    progress: Arc<AtomicU64>,
    epoch: Instant,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut held = self.body.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(inner) = held.body.as_mut() else {
            return Poll::Ready(Some(Err(
                "the response body made no progress for idle_timeout".into(),
            )));
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if polled.is_ready() {
            let now = self.epoch.elapsed().as_millis() as u64;
            self.progress.store(now, Ordering::Relaxed);
        } else if !held.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            held.waker = Some(cx.waker().clone());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .body
            .as_ref()
            .is_some_and(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .body
            .as_ref()
            .map(http_body::Body::size_hint)
            .unwrap_or_default()
    }
}

/// A connection whose first bytes were already read: they are read again
/// first.
struct Rewound {
    inner: TcpStream,
    read: Bytes,
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        let first = self.read.split_to(n);
        buf.put_slice(&first);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
