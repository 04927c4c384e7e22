//! When a failed attempt may be tried again (SPEC §5), and how long to wait.
//!
//! The retry loop itself is a plain async loop in the proxy (as linkerd's);
//! this module holds its decisions as pure functions, so they can be tested
//! as a table: method × failure × body × attempts × budget.
//!
//! - A connect failure means nothing was sent: safe for any method.
//! - A timeout, a broken response or a `retry_on_status` answer may have
//!   had effects upstream: retried only for idempotent methods (RFC 9110
//!   §9.2.2) or when the client vouches with an `Idempotency-Key`.
//! - A 5xx answer that opened the instance's circuit (or failed its
//!   half-open probe) is treated like a `retry_on_status` answer, whatever
//!   its status: the instance is judged broken, its answer is not the service's.
//! - A body that cannot be sent again (larger than `max_replay_body_bytes`,
//!   and already started) is never retried.
//! - Every retry is paid for from the service's budget.

pub mod budget;
pub mod replay;

use std::time::Duration;

use http::{HeaderMap, Method};
use rand::{Rng, RngExt};

use crate::config::RetryConfig;
pub use crate::outcome::Failure;
pub use budget::RetryBudget;

/// Why a failed attempt is not tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// A status not in `retry_on_status`: the response is the answer.
    NotRetryable,
    /// The failure may have had effects and the request is not idempotent.
    NotIdempotent,
    /// The request body was streamed and cannot be sent again.
    BodyGone,
    /// `max_attempts` reached.
    AttemptsExhausted,
    /// The service's retry budget is spent.
    BudgetSpent,
}

/// What the decision needs to know about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTraits {
    /// Idempotent method, or an `Idempotency-Key` header.
    pub idempotent: bool,
    /// The body can be sent again (empty, buffered, or not yet started).
    pub replayable: bool,
}

impl RequestTraits {
    pub fn new(method: &Method, headers: &HeaderMap, replayable: bool) -> Self {
        Self {
            idempotent: is_idempotent(method) || headers.contains_key("idempotency-key"),
            replayable,
        }
    }
}

/// RFC 9110 §9.2.2: the methods whose repetition has the effect of one.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether the failure of attempt number `attempts` (1-based) may be retried;
/// on `Ok`, one retry has been withdrawn from `budget`.
pub fn decide(
    failure: Failure,
    request: RequestTraits,
    attempts: u32,
    config: &RetryConfig,
    budget: &RetryBudget,
) -> Result<(), GiveUp> {
    match failure {
        Failure::Status(status) if !config.retry_on_status.contains(&status) => {
            return Err(GiveUp::NotRetryable);
        }
        Failure::Connect | Failure::Forbidden => {}
        Failure::Timeout | Failure::Broken | Failure::Status(_) | Failure::Tripped(_)
            if !request.idempotent =>
        {
            return Err(GiveUp::NotIdempotent);
        }
        Failure::Timeout | Failure::Broken | Failure::Status(_) | Failure::Tripped(_) => {}
    }
    if !request.replayable {
        return Err(GiveUp::BodyGone);
    }
    if attempts >= config.max_attempts {
        return Err(GiveUp::AttemptsExhausted);
    }
    if !budget.withdraw() {
        return Err(GiveUp::BudgetSpent);
    }
    Ok(())
}

/// Full-jitter exponential backoff before retry number `retry` (1-based):
/// uniform in `[0, min(backoff_max, backoff_base × 2^(retry-1))]`.
pub fn backoff<R: Rng + ?Sized>(config: &RetryConfig, retry: u32, rng: &mut R) -> Duration {
    let exp = config
        .backoff_base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
    let cap = exp.min(config.backoff_max);
    if cap.is_zero() {
        return Duration::ZERO;
    }
    cap.mul_f64(rng.random_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    const GET: RequestTraits = RequestTraits {
        idempotent: true,
        replayable: true,
    };
    const POST: RequestTraits = RequestTraits {
        idempotent: false,
        replayable: true,
    };
    const GET_STREAMED: RequestTraits = RequestTraits {
        idempotent: true,
        replayable: false,
    };
    const POST_STREAMED: RequestTraits = RequestTraits {
        idempotent: false,
        replayable: false,
    };

    fn plenty() -> RetryBudget {
        RetryBudget::new(0.2, 1000)
    }

    fn spent() -> RetryBudget {
        RetryBudget::new(0.0, 0)
    }

    /// Failure, request, attempts so far, budget left, expected decision.
    type Row = (Failure, RequestTraits, u32, bool, Result<(), GiveUp>);

    #[tokio::test(start_paused = true)]
    async fn decision_table() {
        use Failure::*;
        use GiveUp::*;
        let config = RetryConfig::default();
        #[rustfmt::skip]
        let table: &[Row] = &[
            // failure,     request,       attempts, budget, decision
            (Connect,       GET,           1, true,  Ok(())),
            (Connect,       POST,          1, true,  Ok(())),
            (Connect,       POST,          2, true,  Ok(())),
            (Connect,       POST,          3, true,  Err(AttemptsExhausted)),
            (Connect,       POST_STREAMED, 1, true,  Err(BodyGone)),
            (Connect,       GET,           1, false, Err(BudgetSpent)),
            (Forbidden,     POST,          1, true,  Ok(())),
            (Timeout,       GET,           1, true,  Ok(())),
            (Timeout,       POST,          1, true,  Err(NotIdempotent)),
            (Timeout,       GET_STREAMED,  1, true,  Err(BodyGone)),
            (Timeout,       GET,           1, false, Err(BudgetSpent)),
            (Broken,        GET,           2, true,  Ok(())),
            (Broken,        POST,          1, true,  Err(NotIdempotent)),
            (Status(503),   GET,           1, true,  Ok(())),
            (Status(502),   GET,           1, true,  Ok(())),
            (Status(504),   GET,           2, true,  Ok(())),
            (Status(503),   GET,           3, true,  Err(AttemptsExhausted)),
            (Status(503),   POST,          1, true,  Err(NotIdempotent)),
            (Status(503),   GET_STREAMED,  1, true,  Err(BodyGone)),
            (Status(503),   GET,           1, false, Err(BudgetSpent)),
            (Status(500),   GET,           1, true,  Err(NotRetryable)),
            (Status(429),   GET,           1, true,  Err(NotRetryable)),
            (Tripped(500),  GET,           1, true,  Ok(())),
            (Tripped(500),  GET,           3, true,  Err(AttemptsExhausted)),
            (Tripped(500),  POST,          1, true,  Err(NotIdempotent)),
            (Tripped(501),  GET_STREAMED,  1, true,  Err(BodyGone)),
            (Tripped(500),  GET,           1, false, Err(BudgetSpent)),
        ];
        for &(failure, request, attempts, budget, expected) in table {
            let budget = if budget { plenty() } else { spent() };
            let got = decide(failure, request, attempts, &config, &budget);
            assert_eq!(got, expected, "{failure:?} {request:?} attempt {attempts}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_is_charged_to_the_budget_only_when_taken() {
        let config = RetryConfig::default();
        let budget = RetryBudget::new(0.0, 1);
        let before = budget.available();
        assert_eq!(
            decide(Failure::Timeout, POST, 1, &config, &budget),
            Err(GiveUp::NotIdempotent)
        );
        assert_eq!(budget.available(), before);
        assert_eq!(decide(Failure::Timeout, GET, 1, &config, &budget), Ok(()));
        assert_eq!(budget.available(), before - 1);
    }

    #[test]
    fn idempotency() {
        let mut headers = HeaderMap::new();
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(RequestTraits::new(&m, &headers, true).idempotent, "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!RequestTraits::new(&m, &headers, true).idempotent, "{m}");
        }
        headers.insert("idempotency-key", "abc".parse().unwrap());
        assert!(RequestTraits::new(&Method::POST, &headers, true).idempotent);
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let config = RetryConfig::default(); // 25ms base, 250ms max
        let mut rng = SmallRng::seed_from_u64(7);
        for (retry, cap) in [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (30, 250)] {
            let samples: Vec<_> = (0..2000)
                .map(|_| backoff(&config, retry, &mut rng))
                .collect();
            let max = samples.iter().max().unwrap();
            let min = samples.iter().min().unwrap();
            assert!(*max <= Duration::from_millis(cap), "retry {retry}: {max:?}");
            assert!(
                *max > Duration::from_millis(cap) * 9 / 10,
                "retry {retry} spreads to the cap"
            );
            assert!(
                *min < Duration::from_millis(cap) / 10,
                "retry {retry} spreads to zero"
            );
        }
        let zero = RetryConfig {
            backoff_base: Duration::ZERO,
            ..config
        };
        assert_eq!(backoff(&zero, 3, &mut rng), Duration::ZERO);
    }
}
