//! The request body, kept so it can be sent again when it is small enough.
//!
//! A body of at most `max_replay_body_bytes` is read in full before the first
//! attempt (as nginx buffers request bodies) and every attempt sends it
//! again: the chunks are kept as they were read, shared by every attempt,
//! never copied into one buffer. A larger body is streamed, never held
//! whole in memory, and can be sent only once; it waits in a slot until an
//! attempt's connection starts reading it, so an attempt that fails to
//! connect (nothing sent) leaves it in place for the next one.
//!
//! A client body that stalls fails with the gateway's idle limit (the
//! stack puts it on every request body), read here like any other error.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::body::{self, Body, BoxError};

/// The request body of one proxied request.
pub enum RequestBody {
    /// Empty or read in full: every attempt sends it.
    Buffered(Kept),
    /// Too large to keep: sent at most once.
    Streamed { slot: Arc<Mutex<Option<Body>>> },
}

/// Resolves once an attempt's streamed body has been sent to its end (or
/// failed); the attempt's timeout starts then.
pub type UploadDone = watch::Receiver<bool>;

impl RequestBody {
    /// Reads up to `max_replay` bytes; a body that ends within them is
    /// buffered, a longer one (or one declared longer) is streamed.
    /// The body's own error (the client's fault) is returned as it came.
    pub async fn read<B>(
        body: B,
        declared_length: Option<u64>,
        max_replay: u64,
    ) -> Result<Self, BoxError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Most requests have no body: nothing to read or box.
        if declared_length == Some(0) || body.is_end_stream() {
            return Ok(Self::Buffered(Kept::default()));
        }
        let mut body = body::boxed(body);
        if declared_length.is_some_and(|len| len > max_replay) {
            return Ok(Self::streamed(body));
        }
        let mut chunks = VecDeque::new();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame?;
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
                return Ok(Self::streamed(rest));
            }
        }
        Ok(Self::Buffered(Kept {
            chunks: chunks.into_iter().collect(),
            len: total,
        }))
    }

    fn streamed(body: Body) -> Self {
        Self::Streamed {
            slot: Arc::new(Mutex::new(Some(body))),
        }
    }

    /// Whether another attempt can still send this body.
    pub fn replayable(&self) -> bool {
        match self {
            Self::Buffered(_) => true,
            Self::Streamed { slot } => lock(slot).is_some(),
        }
    }

    /// The body for the next attempt, with the signal of its upload's end
    /// when it streams; `None` once a streamed body has been sent.
    pub fn for_attempt(&self) -> Option<(Body, Option<UploadDone>)> {
        match self {
            Self::Buffered(kept) => Some((kept.body(), None)),
            Self::Streamed { slot } => {
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

/// A body read in full: its chunks as they came.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    chunks: Arc<[Bytes]>,
    len: u64,
}

impl Kept {
    /// A body kept as these chunks.
    #[cfg(test)]
    pub(crate) fn of(chunks: Vec<Bytes>) -> Self {
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        Self {
            chunks: chunks.into(),
            len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body for one attempt: the kept chunks, not copied, with their
    /// exact length.
    pub(crate) fn body(&self) -> Body {
        match &self.chunks[..] {
            _ if self.is_empty() => body::empty(),
            [one] => body::full(one.clone()),
            _ => body::boxed(Replayed {
                kept: self.clone(),
                next: 0,
                left: self.len,
            }),
        }
    }
}

/// One attempt's pass over a [`Kept`] body.
struct Replayed {
    kept: Kept,
    /// The next chunk to send.
    next: usize,
    /// The bytes from there on.
    left: u64,
}

impl http_body::Body for Replayed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let Some(chunk) = self.kept.chunks.get(self.next).cloned() else {
            return Poll::Ready(None);
        };
        self.next += 1;
        self.left -= chunk.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.kept.chunks.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

fn lock(slot: &Mutex<Option<Body>>) -> std::sync::MutexGuard<'_, Option<Body>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

    #[tokio::test]
    async fn small_bodies_are_buffered_and_replayed() {
        let body = RequestBody::read(chunks(3, 10), None, 64).await.unwrap();
        assert!(matches!(body, RequestBody::Buffered(ref b) if b.len() == 30));
        let expected: Vec<u8> = (0..3u8).flat_map(|i| vec![i; 10]).collect();
        for _ in 0..3 {
            let (attempt, upload) = body.for_attempt().unwrap();
            assert!(upload.is_none());
            // The upstream connection frames the body by its exact size.
            assert_eq!(http_body::Body::size_hint(&attempt).exact(), Some(30));
            assert_eq!(bytes_of(attempt).await, expected);
        }
        assert!(body.replayable());
    }

    #[tokio::test]
    async fn a_body_of_exactly_the_limit_is_buffered() {
        let body = RequestBody::read(chunks(2, 32), None, 64).await.unwrap();
        assert!(matches!(body, RequestBody::Buffered(ref b) if b.len() == 64));
        let body = RequestBody::read(chunks(2, 32), Some(64), 64)
            .await
            .unwrap();
        assert!(matches!(body, RequestBody::Buffered(_)));
    }

    #[tokio::test]
    async fn large_bodies_stream_once_with_nothing_lost() {
        let body = RequestBody::read(chunks(10, 10), None, 25).await.unwrap();
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
        let body = RequestBody::read(body::boxed(Stalled), Some(1 << 30), 64)
            .await
            .unwrap();
        assert!(matches!(body, RequestBody::Streamed { .. }));
    }

    #[tokio::test]
    async fn an_unsent_stream_stays_for_the_next_attempt() {
        let body = RequestBody::read(chunks(4, 10), Some(40), 8).await.unwrap();
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

    #[tokio::test]
    async fn a_broken_body_is_the_error_it_came_with() {
        struct Broken;
        impl http_body::Body for Broken {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                Poll::Ready(Some(Err(Box::new(crate::body::BodyStalled))))
            }
        }
        let Err(error) = RequestBody::read(body::boxed(Broken), None, 64).await else {
            panic!("read a broken body");
        };
        assert!(error.is::<crate::body::BodyStalled>());
    }
}
