use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use super::{CircuitOpen, Permit};
use crate::body::BoxError;

pin_project! {
    /// The response of a call through [`super::CircuitBreaker`]: records the
    /// outcome in the circuit when the inner call completes. Dropped before
    /// that (the request was cancelled), its permit releases any probe slot
    /// without counting a success or a failure.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] inner: F, permit: Option<Permit> },
        Refused { error: CircuitOpen },
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn called(inner: F, permit: Permit) -> Self {
        Self {
            state: State::Called {
                inner,
                permit: Some(permit),
            },
        }
    }

    pub(super) fn refused(error: CircuitOpen) -> Self {
        Self {
            state: State::Refused { error },
        }
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { inner, permit } => {
                let result = ready!(inner.poll(cx)).map_err(Into::into);
                if let Some(permit) = permit.take() {
                    permit.settle(&result);
                }
                Poll::Ready(result)
            }
            StateProj::Refused { error } => Poll::Ready(Err((*error).into())),
        }
    }
}
