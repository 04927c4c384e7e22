use std::sync::Arc;

use tower::Layer;

use super::{Breaker, CircuitBreaker};

/// Applies one instance's circuit to a service.
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    breaker: Arc<Breaker>,
}

impl CircuitBreakerLayer {
    pub fn new(breaker: Arc<Breaker>) -> Self {
        Self { breaker }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.breaker.clone())
    }
}
