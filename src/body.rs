//! The one body type used end to end, and constructors for bodies the
//! gateway makes up itself.
//!
//! Upstream and client bodies are streamed as `Body` without being collected;
//! only the capped replay buffer (see `retry::replay`) ever holds a whole body.

use bytes::Bytes;
use std::future::Future;

use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// Errors carried by bodies: hyper's, the replay buffer's, timeouts.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body, boxed once so every handler and the proxy agree on it.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes` in full.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with no bytes at all.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Whether a response with `status` has no body whatever its headers say
/// (RFC 9110 §6.4.1: 1xx, 204, 304).
pub fn status_has_no_body(status: http::StatusCode) -> bool {
    status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
}

/// Boxes any body whose error converts into [`BoxError`], without buffering it.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// The error of a request body that made no progress for
/// `body_idle_timeout`: the client's fault, answered 408.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyStalled;

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body made no progress for body_idle_timeout")
    }
}

impl std::error::Error for BodyStalled {}

/// A body that fails with [`BodyStalled`] when it has no frame ready for
/// `idle` while someone waits for one. Time its reader spends elsewhere
/// does not count: the clock runs only while the body is awaited.
///
/// (tower-http's `TimeoutBody` would start a timer on every frame, ready
/// or not, and hides the body's size, which framing depends on.)
pub struct IdleTimeout<B> {
    inner: B,
    idle: std::time::Duration,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: std::time::Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            armed: false,
        }
    }
}

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = tokio::time::Instant::now() + this.idle;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !this.armed {
            timer.as_mut().reset(deadline);
            this.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyStalled.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why [`collect_capped`] gave up.
#[derive(Debug)]
pub enum CollectError {
    /// More than the limit.
    TooLarge,
    /// The body failed (stalled past its idle limit, or broke off).
    Broken(BoxError),
}

/// Reads a whole body of at most `limit` bytes.
pub async fn collect_capped<B>(body: B, limit: usize) -> Result<Bytes, CollectError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CollectError::Broken(e.into()))?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > limit {
                return Err(CollectError::TooLarge);
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(collected))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A body that yields one frame, then waits until `gate` opens.
    struct Gate {
        first: Option<Bytes>,
        gate: tokio::sync::watch::Receiver<bool>,
    }

    impl http_body::Body for Gate {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            if let Some(first) = self.first.take() {
                return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first))));
            }
            let mut changed = std::pin::pin!(self.gate.changed());
            match changed.as_mut().poll(cx) {
                std::task::Poll::Ready(_) => std::task::Poll::Ready(None),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_stalled_while_awaited_fails_after_the_idle_time() {
        let (_open, gate) = tokio::sync::watch::channel(false);
        let body = IdleTimeout::new(
            Gate {
                first: Some(Bytes::from_static(b"a")),
                gate,
            },
            Duration::from_secs(30),
        );
        let mut body = std::pin::pin!(body);
        // Time spent before anyone waits on the body does not count.
        tokio::time::advance(Duration::from_secs(100)).await;
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        let started = tokio::time::Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<BodyStalled>());
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn progress_keeps_it_alive_and_size_shows_through() {
        let (open, gate) = tokio::sync::watch::channel(false);
        let body = IdleTimeout::new(Gate { first: None, gate }, Duration::from_secs(30));
        let mut body = std::pin::pin!(body);
        let opener = async {
            tokio::time::sleep(Duration::from_secs(29)).await;
            open.send(true).unwrap();
        };
        let (frame, ()) = tokio::join!(body.frame(), opener);
        assert!(frame.is_none(), "ended in time");
        let sized = IdleTimeout::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            Duration::from_secs(1),
        );
        assert_eq!(http_body::Body::size_hint(&sized).exact(), Some(3));
        let empty = IdleTimeout::new(
            http_body_util::Empty::<Bytes>::new(),
            Duration::from_secs(1),
        );
        assert!(http_body::Body::is_end_stream(&empty));
    }
}
