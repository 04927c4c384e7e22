//! The admin token (SPEC §6): with `gateway.admin_token` set, every registry
//! write (`POST`, `PUT`, `PATCH`, `DELETE`) needs `Authorization: Bearer
//! <token>`; reads stay open. The comparison takes the same time wherever
//! the tokens differ, so response timing does not reveal how much of a
//! guess was right.
//!
//! [`AdminToken`] is the check as a validator for tower-http's
//! `ValidateRequestHeaderLayer`, the layer in front of the registry API.
//! Its clones share one token, which a reload replaces for all of them.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{HeaderMap, Method, Request, Response, header};
use subtle::ConstantTimeEq;
use tower_http::validate_request::ValidateRequest;

use crate::body::Body;
use crate::error::{ErrorCode, GatewayError};

/// Whether `method` changes the registry.
pub fn is_write(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// Refuses registry writes that do not carry the admin token (401).
#[derive(Debug, Clone)]
pub struct AdminToken {
    token: Arc<ArcSwap<String>>,
}

impl AdminToken {
    /// An empty `token` lets every request through.
    pub fn new(token: &str) -> Self {
        Self {
            token: Arc::new(ArcSwap::from_pointee(token.to_string())),
        }
    }

    /// Makes `token` the one this validator and all its clones check, from
    /// the next request on.
    pub fn set(&self, token: &str) {
        self.token.store(Arc::new(token.to_string()));
    }
}

impl<B> ValidateRequest<B> for AdminToken {
    type ResponseBody = Body;

    fn validate(&mut self, request: &mut Request<B>) -> Result<(), Response<Body>> {
        if !is_write(request.method()) {
            return Ok(());
        }
        authorize(&self.token.load(), request.headers()).map_err(GatewayError::into_response)
    }
}

/// `Ok` when no token is configured or the request carries it.
pub fn authorize(token: &str, headers: &HeaderMap) -> Result<(), GatewayError> {
    if token.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer);
    match presented {
        Some(presented) if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) => Ok(()),
        Some(_) => Err(GatewayError::new(
            ErrorCode::Unauthorized,
            "the bearer token is not the admin token",
        )),
        None => Err(GatewayError::new(
            ErrorCode::Unauthorized,
            "registry writes need 'Authorization: Bearer <admin token>'",
        )),
    }
}

/// The credentials of a `Bearer` authorization (the scheme is
/// case-insensitive, RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(auth) = auth {
            h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        }
        h
    }

    #[test]
    fn no_token_configured_lets_everything_through() {
        assert!(authorize("", &headers(None)).is_ok());
    }

    #[test]
    fn the_right_bearer_token_passes() {
        assert!(authorize("s3cret", &headers(Some("Bearer s3cret"))).is_ok());
        assert!(authorize("s3cret", &headers(Some("bearer s3cret"))).is_ok());
    }

    #[test]
    fn missing_wrong_or_malformed_credentials_are_refused() {
        for auth in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("Basic czNjcmV0"),
            Some("s3cret"),
            Some("Bearer"),
        ] {
            let e = authorize("s3cret", &headers(auth)).unwrap_err();
            assert_eq!(e.code(), ErrorCode::Unauthorized, "{auth:?}");
        }
    }

    #[test]
    fn writes_are_the_methods_that_change_things() {
        for write in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(is_write(&write), "{write}");
        }
        for read in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(!is_write(&read), "{read}");
        }
    }

    #[test]
    fn the_validator_guards_writes_only() {
        let mut token = AdminToken::new("s3cret");
        let mut get = Request::get("/services").body(()).unwrap();
        assert!(token.validate(&mut get).is_ok());
        let mut post = Request::post("/services").body(()).unwrap();
        let refused = token.validate(&mut post).unwrap_err();
        assert_eq!(refused.status(), http::StatusCode::UNAUTHORIZED);
        assert_eq!(refused.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let mut post = Request::post("/services")
            .header("authorization", "Bearer s3cret")
            .body(())
            .unwrap();
        assert!(token.validate(&mut post).is_ok());
    }

    #[test]
    fn a_new_token_replaces_the_old_in_every_clone() {
        let token = AdminToken::new("old");
        let mut clone = token.clone();
        token.set("new");
        let mut with = |bearer: &str| {
            let mut post = Request::post("/services")
                .header("authorization", format!("Bearer {bearer}"))
                .body(())
                .unwrap();
            clone.validate(&mut post).is_ok()
        };
        assert!(!with("old"));
        assert!(with("new"));
    }
}
