//! The admin token (SPEC §6): with `gateway.admin_token` set, every registry
//! write (`POST`, `DELETE`) needs `Authorization: Bearer <token>`; reads stay
//! open. The comparison takes the same time wherever the tokens differ, so
//! response timing does not reveal how much of a guess was right.

use http::{HeaderMap, Method, header};
use subtle::ConstantTimeEq;

use crate::error::{ErrorCode, GatewayError};

/// Whether `method` changes the registry.
pub fn is_write(method: &Method) -> bool {
    *method == Method::POST || *method == Method::DELETE
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
    fn writes_are_post_and_delete() {
        assert!(is_write(&Method::POST) && is_write(&Method::DELETE));
        assert!(!is_write(&Method::GET) && !is_write(&Method::HEAD) && !is_write(&Method::PUT));
    }
}
