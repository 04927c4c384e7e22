//! The circuit breaker: a tower layer, one per instance.
//!
//! `CircuitBreakerLayer::new(breaker)` wraps the service that calls one
//! instance. Each call first asks the instance's circuit for admission: when
//! it refuses, the call fails at once with [`CircuitOpen`] and the instance
//! is not touched. Otherwise the attempt's outcome is classified when it
//! arrives (response headers, not the end of the body) by the one
//! classifier the retry decision reads too ([`crate::outcome`]): the
//! instance's failures (connect failure, timeout, broken response, status
//! ≥ 500) count against it, its successes for it, and what was not its
//! doing (the client's body failing, the caller giving up) not at all.
//!
//! Classification, admission and the trip policy are kept apart, as in
//! linkerd's breaker: [`crate::outcome::Outcome::of`] decides what counts as a failure,
//! [`shared::Breaker`] admits and records, and [`state::BreakerMachine`]
//! holds the trip policy as plain data.

mod error;
mod future;
mod layer;
mod shared;
pub mod state;

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use tower::Service;

use crate::body::BoxError;
pub use error::CircuitOpen;
pub use future::ResponseFuture;
pub use layer::CircuitBreakerLayer;
pub use shared::{Breaker, CircuitSnapshot, Permit};
pub use state::{
    Admission, Blocked, BreakerMachine, CircuitState, FailureCause, Refused, Transition,
};

/// Wraps `S` (the call to one instance) in that instance's circuit.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> CircuitBreaker<S> {
    pub fn new(inner: S, breaker: Arc<Breaker>) -> Self {
        Self { inner, breaker }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, Req, RB> Service<Req> for CircuitBreaker<S>
where
    S: Service<Req, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Admission is decided per call, not here: readiness would have to
        // hold a probe slot between `poll_ready` and `call`.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        match self.breaker.try_admit() {
            Ok(permit) => ResponseFuture::called(self.inner.call(request), permit),
            Err(refused) => ResponseFuture::refused(CircuitOpen {
                retry_after: refused.retry_after,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CircuitBreakerConfig;
    use http::Request;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::oneshot;
    use tower::{Layer, ServiceExt};

    fn breaker(failures: u32, reset: Duration, probes: u32) -> Arc<Breaker> {
        let config = CircuitBreakerConfig {
            failure_threshold: failures,
            reset_timeout: reset,
            half_open_max_requests: probes,
        };
        Arc::new(Breaker::new(&config, "svc".into(), "i-1".into()))
    }

    /// An inner service answering each request with the status in its URI
    /// path (`/500`), or an error for `/error`, counting calls.
    fn upstream(
        calls: Arc<AtomicUsize>,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone {
        tower::service_fn(move |request: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let path = request.uri().path().trim_start_matches('/').to_string();
                if path == "error" {
                    return Err::<Response<()>, BoxError>("connection refused".into());
                }
                let mut response = Response::new(());
                *response.status_mut() = http::StatusCode::from_bytes(path.as_bytes()).unwrap();
                Ok(response)
            }
        })
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    async fn call<S>(svc: &S, path: &str) -> Result<u16, BoxError>
    where
        S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone,
    {
        svc.clone()
            .oneshot(get(path))
            .await
            .map(|r| r.status().as_u16())
    }

    #[tokio::test(start_paused = true)]
    async fn failures_open_the_circuit_and_open_refuses_without_calling() {
        let calls = Arc::new(AtomicUsize::new(0));
        let b = breaker(3, Duration::from_secs(30), 1);
        let svc = CircuitBreakerLayer::new(b.clone()).layer(upstream(calls.clone()));
        assert_eq!(call(&svc, "/500").await.unwrap(), 500);
        assert!(call(&svc, "/error").await.is_err());
        assert_eq!(call(&svc, "/404").await.unwrap(), 404, "4xx is a success");
        assert_eq!(b.snapshot(), (CircuitState::Closed, 0));
        call(&svc, "/503").await.unwrap();
        call(&svc, "/error").await.unwrap_err();
        assert_eq!(b.snapshot(), (CircuitState::Closed, 2));
        call(&svc, "/502").await.unwrap();
        assert_eq!(b.snapshot(), (CircuitState::Open, 3));
        let before = calls.load(Ordering::SeqCst);
        let error = call(&svc, "/200").await.unwrap_err();
        let open = error.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
        assert_eq!(open.retry_after, Duration::from_secs(30));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before,
            "an open circuit calls nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_reset_timeout_then_closed_by_a_probe() {
        let calls = Arc::new(AtomicUsize::new(0));
        let b = breaker(1, Duration::from_secs(10), 1);
        let svc = CircuitBreakerLayer::new(b.clone()).layer(upstream(calls));
        call(&svc, "/500").await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(call(&svc, "/200").await.is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.snapshot().0, CircuitState::HalfOpen);
        // A failing probe re-opens for another reset_timeout.
        call(&svc, "/500").await.unwrap();
        assert_eq!(b.snapshot().0, CircuitState::Open);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(call(&svc, "/200").await.unwrap(), 200);
        assert_eq!(b.snapshot(), (CircuitState::Closed, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_at_most_max_probes_under_concurrency() {
        let b = breaker(1, Duration::from_secs(1), 2);
        // An inner service whose responses the test releases by hand.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<oneshot::Sender<u16>>();
        let inner = tower::service_fn(move |_: Request<()>| {
            let (done_tx, done_rx) = oneshot::channel();
            let _ = tx.send(done_tx);
            async move {
                let status = done_rx.await.unwrap_or(500);
                let mut response = Response::new(());
                *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok::<_, BoxError>(response)
            }
        });
        let svc = CircuitBreakerLayer::new(b.clone()).layer(inner);
        // Trip it.
        let trip = tokio::spawn(svc.clone().oneshot(get("/")));
        rx.recv().await.unwrap().send(500).unwrap();
        trip.await.unwrap().unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;

        // Ten concurrent requests: two probes reach the instance, eight are refused.
        let mut tasks = Vec::new();
        for _ in 0..10 {
            tasks.push(tokio::spawn(svc.clone().oneshot(get("/"))));
        }
        let mut probes = Vec::new();
        for _ in 0..2 {
            probes.push(rx.recv().await.unwrap());
        }
        let mut refused = 0;
        let mut pending = Vec::new();
        for task in tasks {
            if task.is_finished() {
                let result = task.await.unwrap();
                assert!(result.unwrap_err().is::<CircuitOpen>());
                refused += 1;
            } else {
                pending.push(task);
            }
        }
        // Refusals complete at once; let any still being scheduled finish.
        tokio::task::yield_now().await;
        let mut still = Vec::new();
        for task in pending {
            if task.is_finished() {
                assert!(task.await.unwrap().unwrap_err().is::<CircuitOpen>());
                refused += 1;
            } else {
                still.push(task);
            }
        }
        assert_eq!(refused, 8);
        assert_eq!(still.len(), 2);
        assert!(
            rx.try_recv().is_err(),
            "no third probe reached the instance"
        );

        // Cancelling one probe frees its slot; the other's success closes.
        still.remove(0).abort();
        tokio::task::yield_now().await;
        assert!(b.would_admit(tokio::time::Instant::now()));
        probes.remove(1).send(200).unwrap();
        assert_eq!(still.remove(0).await.unwrap().unwrap().status(), 200);
        assert_eq!(b.snapshot().0, CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_cancelled_by_its_caller_never_wedges_half_open() {
        let b = breaker(1, Duration::from_secs(1), 1);
        let hang = tower::service_fn(|_: Request<()>| async {
            std::future::pending::<Result<Response<()>, BoxError>>().await
        });
        let svc = CircuitBreakerLayer::new(b.clone()).layer(hang);
        let _ = b.try_admit().map(|p| p.failure(FailureCause::Status(500)));
        tokio::time::advance(Duration::from_secs(1)).await;
        // The caller gives up on the probe (its own timeout).
        let probe =
            tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get("/"))).await;
        assert!(probe.is_err());
        assert_eq!(b.snapshot().0, CircuitState::HalfOpen);
        assert!(
            b.would_admit(tokio::time::Instant::now()),
            "the slot came back"
        );
    }
}
