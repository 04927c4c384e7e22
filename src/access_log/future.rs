use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body_util::BodyExt;

use super::{Entry, LoggedBody};
use crate::body::Body;
use crate::proxy::Served;

pin_project_lite::pin_project! {
    /// The response of [`super::AccessLog`]: with its entry, the response
    /// body that writes the line. Dropped before the response is ready,
    /// the line is written at once, as the client's going away.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        entry: Option<Entry>,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, entry: Option<Entry>) -> Self {
        Self { inner, entry }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        let Some(mut entry) = this.entry.take() else {
            return Poll::Ready(Ok(response));
        };
        entry.status = Some(response.status());
        if let Some(served) = response.extensions_mut().remove::<Served>() {
            entry.served = served;
        }
        Poll::Ready(Ok(
            response.map(|body| LoggedBody::new(body, entry).boxed_unsync())
        ))
    }
}
