use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::Entry;
use crate::body::{Body, BoxError};

/// A request body that counts the bytes read from it into a counter its
/// access entry shares.
pub struct CountedBody {
    inner: Body,
    read: Arc<AtomicU64>,
}

impl CountedBody {
    pub(super) fn new(inner: Body, read: Arc<AtomicU64>) -> Self {
        Self { inner, read }
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            self.read.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts the bytes taken from it and writes its
/// access line when it ends, fails, or is dropped before.
pub struct LoggedBody {
    inner: Body,
    /// Taken (and so written) once the body is over.
    entry: Option<Entry>,
}

impl LoggedBody {
    pub(super) fn new(inner: Body, entry: Entry) -> Self {
        Self {
            inner,
            entry: Some(entry),
        }
    }
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let over = match &frame {
            Some(Ok(frame)) => {
                if let (Some(data), Some(entry)) = (frame.data_ref(), this.entry.as_mut()) {
                    entry.bytes_out += data.len() as u64;
                }
                // A server may stop polling at the last frame.
                this.inner.is_end_stream()
            }
            Some(Err(_)) | None => true,
        };
        if over {
            drop(this.entry.take());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
