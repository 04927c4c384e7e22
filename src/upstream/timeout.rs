//! One attempt's time limit, as a tower service inside the circuit breaker,
//! so that a timed-out attempt counts as the instance's failure. Built once
//! per instance, like the rest of its stack: each request carries its own
//! deadline ([`Deadlined`]).
//!
//! A buffered request's attempt runs until `min(now + per_try_timeout,
//! request deadline)`. A streamed request's clock starts only once its body
//! has been sent (as Envoy's route timeout does), so a long upload is not cut
//! off by a timeout meant for the upstream's answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::body::BoxError;
use crate::retry::replay::UploadDone;

/// When an attempt gives up waiting for response headers.
#[derive(Debug, Clone)]
pub enum Deadline {
    /// No limit here (the caller bounds the attempt itself).
    None,
    At(Instant),
    /// `timeout` after the request body has been sent in full.
    AfterUpload {
        timeout: Duration,
        upload: UploadDone,
    },
}

/// The marker error of an attempt that ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no response headers before the deadline")
    }
}

impl std::error::Error for TimedOut {}

/// A request that carries the deadline of its attempt.
pub trait Deadlined {
    fn deadline(&self) -> &Deadline;
}

/// Bounds each call of `S` by its request's deadline.
#[derive(Debug, Clone)]
pub struct AttemptTimeout<S> {
    inner: S,
}

impl<S> AttemptTimeout<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Applies [`AttemptTimeout`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptTimeoutLayer;

impl<S> tower::Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;

    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout::new(inner)
    }
}

impl<S, Req> Service<Req> for AttemptTimeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Deadlined,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let timer = match request.deadline() {
            Deadline::None => Timer::Never,
            Deadline::At(at) => Timer::At {
                sleep: tokio::time::sleep_until(*at),
            },
            Deadline::AfterUpload { timeout, upload } => {
                let (timeout, mut upload) = (*timeout, upload.clone());
                Timer::AfterUpload {
                    // Rare (bodies over the replay limit): a boxed future is fine.
                    wait: Box::pin(async move {
                        // An error means the body is gone: finished either way.
                        let _ = upload.wait_for(|sent| *sent).await;
                        tokio::time::sleep(timeout).await;
                    }),
                }
            }
        };
        TimeoutFuture {
            inner: self.inner.call(request),
            timer,
        }
    }
}

pin_project! {
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        timer: Timer,
    }
}

pin_project! {
    #[project = TimerProj]
    enum Timer {
        Never,
        At { #[pin] sleep: Sleep },
        AfterUpload { wait: Pin<Box<dyn Future<Output = ()> + Send>> },
    }
}

impl<F, T, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        let expired = match this.timer.project() {
            TimerProj::Never => false,
            TimerProj::At { sleep } => sleep.poll(cx).is_ready(),
            TimerProj::AfterUpload { wait } => wait.as_mut().poll(cx).is_ready(),
        };
        if expired {
            Poll::Ready(Err(TimedOut.into()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// A request that is only its deadline.
    struct Timed(Deadline);

    impl Deadlined for Timed {
        fn deadline(&self) -> &Deadline {
            &self.0
        }
    }

    fn never() -> AttemptTimeout<impl Service<Timed, Response = (), Error = BoxError>> {
        AttemptTimeout::new(tower::service_fn(|_: Timed| {
            std::future::pending::<Result<(), BoxError>>()
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_deadline() {
        let start = Instant::now();
        let error = never()
            .oneshot(Timed(Deadline::At(start + Duration::from_secs(3))))
            .await
            .unwrap_err();
        assert!(error.is::<TimedOut>());
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_in_time_passes_through() {
        let svc = AttemptTimeout::new(tower::service_fn(|_: Timed| async { Ok::<_, BoxError>(7) }));
        let deadline = Deadline::At(Instant::now() + Duration::from_secs(1));
        assert_eq!(svc.oneshot(Timed(deadline)).await.unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_nothing_fires() {
        let attempt = never().oneshot(Timed(Deadline::None));
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), attempt)
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_request_is_timed_from_the_end_of_its_upload() {
        let (sent, upload) = tokio::sync::watch::channel(false);
        let start = Instant::now();
        let deadline = Deadline::AfterUpload {
            timeout: Duration::from_secs(2),
            upload,
        };
        let mut attempt = std::pin::pin!(never().oneshot(Timed(deadline)));
        let early = tokio::time::timeout(Duration::from_secs(60), &mut attempt).await;
        assert!(early.is_err(), "no timeout while the upload is still going");
        sent.send(true).unwrap();
        let error = attempt.await.unwrap_err();
        assert!(error.is::<TimedOut>());
        assert_eq!(start.elapsed(), Duration::from_secs(62));
    }
}
