//! The request body, kept so it can be sent again when it is small enough.
//!
//! A body of at most `max_replay_body_bytes` is read in full before the first
//! attempt (as nginx buffers request bodies) and every attempt sends a copy:
//! `Bytes` clones share one buffer. A larger body is streamed, never held
//! whole in memory, and can be sent only once; it waits in a slot until an
//! attempt's connection starts reading it, so an attempt that fails to
//! connect (nothing sent) leaves it in place for the next one.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::body::{self, Body, BoxError};

/// Why the request body could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// No progress for `body_idle_timeout`.
    Stalled,
    /// The client's body broke off (reset, bad chunking).
    Broken(BoxError),
}

/// The request body of one proxied request.
pub enum RequestBody {
    /// Empty or read in full: every attempt sends a copy.
    Buffered(Bytes),
    /// Too large to keep: sent at most once, and watched as it streams.
    Streamed {
        slot: Arc<Mutex<Option<Body>>>,
        fault: Arc<Fault>,
    },
}

/// What went wrong with a streamed body on its way to the upstream, so the
/// client is told it was its own body (408, 400), not the upstream (502).
#[derive(Debug, Default)]
pub struct Fault(AtomicU8);

impl Fault {
    const STALLED: u8 = 1;
    const BROKEN: u8 = 2;

    fn set(&self, fault: u8) {
        self.0.store(fault, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<ReadError> {
        match self.0.load(Ordering::Relaxed) {
            Self::STALLED => Some(ReadError::Stalled),
            Self::BROKEN => Some(ReadError::Broken("the request body broke off".into())),
            _ => None,
        }
    }
}

/// Resolves once an attempt's streamed body has been sent to its end (or
/// failed); the attempt's timeout starts then.
pub type UploadDone = watch::Receiver<bool>;

impl RequestBody {
    /// Reads up to `max_replay` bytes; a body that ends within them is
    /// buffered, a longer one (or one declared longer) is streamed.
    pub async fn read<B>(
        body: B,
        declared_length: Option<u64>,
        max_replay: u64,
        idle_timeout: Duration,
    ) -> Result<Self, ReadError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Most requests have no body: nothing to read or box.
        if declared_length == Some(0) || body.is_end_stream() {
            return Ok(Self::Buffered(Bytes::new()));
        }
        let mut body = body::boxed(body);
        if declared_length.is_some_and(|len| len > max_replay) {
            return Ok(Self::streamed(body, idle_timeout));
        }
        let mut chunks = VecDeque::new();
        let mut total = 0u64;
        loop {
            let frame = match tokio::time::timeout(idle_timeout, body.frame()).await {
                Err(_) => return Err(ReadError::Stalled),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(ReadError::Broken(e)),
                Ok(Some(Ok(frame))) => frame,
            };
            // Request trailers are rare and not forwarded from a buffered body.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len() as u64;
            chunks.push_back(data);
            if total > max_replay {
                let rest = body::boxed(Prefixed {
                    prefix: chunks,
                    rest: body,
                });
                return Ok(Self::streamed(rest, idle_timeout));
            }
        }
        let bytes = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop_front().unwrap_or_default(),
            _ => {
                let mut all = Vec::with_capacity(total as usize);
                for chunk in chunks {
                    all.extend_from_slice(&chunk);
                }
                Bytes::from(all)
            }
        };
        Ok(Self::Buffered(bytes))
    }

    fn streamed(body: Body, idle_timeout: Duration) -> Self {
        let fault = Arc::new(Fault::default());
        let watched = Watched {
            inner: body,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            fault: fault.clone(),
        };
        Self::Streamed {
            slot: Arc::new(Mutex::new(Some(body::boxed(watched)))),
            fault,
        }
    }

    /// Whether another attempt can still send this body.
    pub fn replayable(&self) -> bool {
        match self {
            Self::Buffered(_) => true,
            Self::Streamed { slot, .. } => lock(slot).is_some(),
        }
    }

    /// Whether the client's body stalled or broke while it was streamed.
    pub fn fault(&self) -> Option<ReadError> {
        match self {
            Self::Buffered(_) => None,
            Self::Streamed { fault, .. } => fault.get(),
        }
    }

    /// The body for the next attempt, with the signal of its upload's end
    /// when it streams; `None` once a streamed body has been sent.
    pub fn for_attempt(&self) -> Option<(Body, Option<UploadDone>)> {
        match self {
            Self::Buffered(bytes) if bytes.is_empty() => Some((body::empty(), None)),
            Self::Buffered(bytes) => Some((body::full(bytes.clone()), None)),
            Self::Streamed { slot, .. } => {
                if lock(slot).is_none() {
                    return None;
                }
                let (done, upload) = watch::channel(false);
                let once = OnceBody {
                    slot: slot.clone(),
                    body: None,
                    done,
                };
                Some((body::boxed(once), Some(upload)))
            }
        }
    }
}

fn lock(slot: &Mutex<Option<Body>>) -> std::sync::MutexGuard<'_, Option<Body>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A streamed client body under watch: no progress for `idle_timeout`
/// ends it with an error, and any failure is noted in `fault`.
struct Watched {
    inner: Body,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    fault: Arc<Fault>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + this.idle_timeout;
                this.idle.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.fault.set(Fault::BROKEN);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.fault.set(Fault::STALLED);
                    Poll::Ready(Some(Err("the request body stalled".into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The chunks read while deciding, then the rest of the body.
struct Prefixed {
    prefix: VecDeque<Bytes>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }
}

/// A streamed body taken out of its slot on first read, so that an attempt
/// that never sent it leaves it for the next one.
struct OnceBody {
    slot: Arc<Mutex<Option<Body>>>,
    body: Option<Body>,
    done: watch::Sender<bool>,
}

impl http_body::Body for OnceBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.body.is_none() {
            this.body = lock(&this.slot).take();
        }
        let Some(body) = this.body.as_mut() else {
            let _ = this.done.send(true);
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            let _ = this.done.send(true);
        }
        polled
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => lock(&self.slot)
                .as_ref()
                .map(|b| b.size_hint())
                .unwrap_or_default(),
        }
    }
}

impl Drop for OnceBody {
    fn drop(&mut self) {
        let _ = self.done.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `n` chunks of `size` bytes (chunk `i` filled with `i`).
    struct Chunks(VecDeque<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(n: usize, size: usize) -> Body {
        body::boxed(Chunks(
            (0..n).map(|i| Bytes::from(vec![i as u8; size])).collect(),
        ))
    }

    /// A body that never sends anything.
    struct Stalled;

    impl http_body::Body for Stalled {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    async fn bytes_of(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    const IDLE: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn small_bodies_are_buffered_and_replayed() {
        let body = RequestBody::read(chunks(3, 10), None, 64, IDLE)
            .await
            .unwrap();
        assert!(matches!(body, RequestBody::Buffered(ref b) if b.len() == 30));
        for _ in 0..3 {
            let (attempt, upload) = body.for_attempt().unwrap();
            assert!(upload.is_none());
            assert_eq!(bytes_of(attempt).await.len(), 30);
        }
        assert!(body.replayable());
    }

    #[tokio::test]
    async fn a_body_of_exactly_the_limit_is_buffered() {
        let body = RequestBody::read(chunks(2, 32), None, 64, IDLE)
            .await
            .unwrap();
        assert!(matches!(body, RequestBody::Buffered(ref b) if b.len() == 64));
        let body = RequestBody::read(chunks(2, 32), Some(64), 64, IDLE)
            .await
            .unwrap();
        assert!(matches!(body, RequestBody::Buffered(_)));
    }

    #[tokio::test]
    async fn large_bodies_stream_once_with_nothing_lost() {
        let body = RequestBody::read(chunks(10, 10), None, 25, IDLE)
            .await
            .unwrap();
        assert!(matches!(body, RequestBody::Streamed { .. }));
        let (attempt, _) = body.for_attempt().unwrap();
        let sent = bytes_of(attempt).await;
        let expected: Vec<u8> = (0..10u8).flat_map(|i| vec![i; 10]).collect();
        assert_eq!(sent, expected, "prefix and rest, in order");
        assert!(!body.replayable());
        assert!(body.for_attempt().is_none());
    }

    #[tokio::test]
    async fn a_declared_large_body_is_not_read_ahead() {
        let body = RequestBody::read(body::boxed(Stalled), Some(1 << 30), 64, IDLE)
            .await
            .unwrap();
        assert!(matches!(body, RequestBody::Streamed { .. }));
    }

    #[tokio::test]
    async fn an_unsent_stream_stays_for_the_next_attempt() {
        let body = RequestBody::read(chunks(4, 10), Some(40), 8, IDLE)
            .await
            .unwrap();
        let (never_sent, _) = body.for_attempt().unwrap();
        drop(never_sent);
        assert!(body.replayable());
        let (attempt, upload) = body.for_attempt().unwrap();
        let mut upload = upload.expect("a streamed body signals its end");
        assert!(!*upload.borrow());
        assert_eq!(bytes_of(attempt).await.len(), 40);
        assert!(upload.wait_for(|done| *done).await.is_ok());
        assert!(!body.replayable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_that_stalls_ends_with_a_fault() {
        let body = RequestBody::read(
            body::boxed(Stalled),
            Some(1 << 20),
            64,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        let (attempt, _) = body.for_attempt().unwrap();
        let started = tokio::time::Instant::now();
        assert!(attempt.collect().await.is_err());
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(matches!(body.fault(), Some(ReadError::Stalled)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_is_reported() {
        let result =
            RequestBody::read(body::boxed(Stalled), None, 64, Duration::from_secs(30)).await;
        assert!(matches!(result, Err(ReadError::Stalled)));
    }
}
