//! How one attempt at an instance ended, decided in one place.
//!
//! Three readers need the answer and must never disagree: the instance's
//! circuit breaker (was it the instance's failure?), the retry decision
//! (may the request go elsewhere?), and the gateway's error answer (what
//! does the client get?). So they all read [`Outcome::of`]:
//!
//! - a **response** came back: a status ≥ 500 is the instance's failure
//!   (SPEC §5), anything else its success;
//! - the attempt **failed** at the instance: no connection, an address
//!   outside the upstream policy, no response head in time, or a broken
//!   response: the instance's failure;
//! - a **client fault**: the client's own request body stalled or broke
//!   off while it was being sent. Not the instance's failure: counting it
//!   would let any client open a healthy instance's circuit by aborting
//!   uploads to it;
//! - **refused**: the circuit did not let the attempt through; nothing
//!   was sent;
//! - **cancelled**: the caller gave up on the attempt (the client went
//!   away); the breaker learns it when the attempt is dropped unfinished,
//!   and it counts for nothing either way.

use http::{Response, StatusCode};

use crate::body::{BodyStalled, BoxError};
use crate::breaker::CircuitOpen;
use crate::error::{ErrorCode, GatewayError};
use crate::upstream::{TimedOut, UpstreamError};

/// How an attempt at an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Response(StatusCode),
    Failed(Failure),
    ClientFault(ClientFault),
    Refused,
    Cancelled,
}

/// What went wrong with one attempt, as the retry decision sees it. An
/// [`Outcome::Failed`] is one of the first four; the proxy adds the last
/// two for answers it does not pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made: nothing was sent.
    Connect,
    /// The instance's address is outside the upstream policy: nothing was sent.
    Forbidden,
    /// No response headers within the attempt's time.
    Timeout,
    /// The request went out but the response was broken (reset, garbage).
    Broken,
    /// A complete response whose status is in `retry_on_status`.
    Status(u16),
    /// A 5xx response from an instance whose circuit it left open (the
    /// failure that tripped it, or a failed half-open probe). The gateway has
    /// judged the instance broken, so its answer is not passed on as the
    /// service's if another instance can be asked.
    Tripped(u16),
}

/// How the client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// No progress for `body_idle_timeout` (408).
    Stalled,
    /// It broke off: the client closed, or its framing was invalid (400).
    Broken,
}

impl Outcome {
    /// The outcome of an attempt that ended with `result`.
    pub fn of<B>(result: &Result<Response<B>, BoxError>) -> Self {
        match result {
            Ok(response) => Self::Response(response.status()),
            Err(error) => Self::of_error(error),
        }
    }

    fn of_error(error: &BoxError) -> Self {
        if error.is::<CircuitOpen>() {
            return Self::Refused;
        }
        if error.is::<TimedOut>() {
            return Self::Failed(Failure::Timeout);
        }
        match error.downcast_ref::<UpstreamError>() {
            Some(UpstreamError::Connect(_)) => Self::Failed(Failure::Connect),
            Some(UpstreamError::Forbidden(_)) => Self::Failed(Failure::Forbidden),
            Some(UpstreamError::ClientBody(e)) => Self::ClientFault(ClientFault::of(&**e)),
            Some(UpstreamError::Broken(_)) | None => Self::Failed(Failure::Broken),
        }
    }

    /// Whether the instance failed: what its circuit counts.
    pub fn is_instance_failure(&self) -> bool {
        match self {
            Self::Response(status) => status.is_server_error(),
            Self::Failed(_) => true,
            Self::ClientFault(_) | Self::Refused | Self::Cancelled => false,
        }
    }
}

impl ClientFault {
    /// Which fault a request body's error is: a stall if the idle limit
    /// ([`BodyStalled`]) is anywhere in its chain, else a break.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if e.is::<BodyStalled>() {
                return Self::Stalled;
            }
            cause = e.source();
        }
        Self::Broken
    }

    /// What the client is answered.
    pub fn into_error(self) -> GatewayError {
        match self {
            Self::Stalled => GatewayError::new(
                ErrorCode::RequestTimeout,
                "the request body stalled past body_idle_timeout",
            ),
            Self::Broken => GatewayError::new(
                ErrorCode::BadRequest,
                "the request body could not be read to its end",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(e: impl Into<BoxError>) -> Result<Response<()>, BoxError> {
        Err(e.into())
    }

    fn status(code: u16) -> Result<Response<()>, BoxError> {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(code).unwrap();
        Ok(response)
    }

    #[test]
    fn every_ending_is_classified_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let table: Vec<(Result<Response<()>, BoxError>, Outcome, bool)> = vec![
            (status(200), Outcome::Response(StatusCode::OK), false),
            (status(404), Outcome::Response(StatusCode::NOT_FOUND), false),
            (
                status(503),
                Outcome::Response(StatusCode::SERVICE_UNAVAILABLE),
                true,
            ),
            (err(TimedOut), Outcome::Failed(Failure::Timeout), true),
            (
                err(UpstreamError::Connect(refused)),
                Outcome::Failed(Failure::Connect),
                true,
            ),
            (
                err(UpstreamError::Broken("garbage".into())),
                Outcome::Failed(Failure::Broken),
                true,
            ),
            (
                err("something else"),
                Outcome::Failed(Failure::Broken),
                true,
            ),
            (
                err(UpstreamError::ClientBody("the client closed".into())),
                Outcome::ClientFault(ClientFault::Broken),
                false,
            ),
            (
                err(UpstreamError::ClientBody(Box::new(BodyStalled))),
                Outcome::ClientFault(ClientFault::Stalled),
                false,
            ),
            (
                err(CircuitOpen {
                    retry_after: std::time::Duration::from_secs(1),
                }),
                Outcome::Refused,
                false,
            ),
        ];
        for (result, outcome, failure) in table {
            assert_eq!(Outcome::of(&result), outcome, "{result:?}");
            assert_eq!(outcome.is_instance_failure(), failure, "{outcome:?}");
        }
        assert!(!Outcome::Cancelled.is_instance_failure());
    }

    #[test]
    fn a_stall_is_found_anywhere_in_the_chain() {
        #[derive(Debug)]
        struct Wrapper(BodyStalled);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(ClientFault::of(&Wrapper(BodyStalled)), ClientFault::Stalled);
        assert_eq!(
            ClientFault::into_error(ClientFault::Stalled).code(),
            ErrorCode::RequestTimeout
        );
        assert_eq!(
            ClientFault::into_error(ClientFault::Broken).code(),
            ErrorCode::BadRequest
        );
    }
}
