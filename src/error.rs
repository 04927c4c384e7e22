//! Errors the gateway answers itself, and the one place they become HTTP.
//!
//! Every response the gateway makes up (as opposed to an upstream's) carries
//! the JSON body `{"error": {"code", "message"}}` and the header
//! `x-switchyard-error: <code>`, so a client can always tell the two apart
//! (SPEC §4).

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};

/// The header naming the gateway's error on every synthetic response.
pub const ERROR_HEADER: &str = "x-switchyard-error";

/// The machine-readable error codes of SPEC §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidName,
    InvalidUrl,
    InvalidPath,
    BadRequest,
    Unauthorized,
    UpstreamForbidden,
    ServiceNotFound,
    InstanceNotFound,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    BodyTooLarge,
    UnsupportedMediaType,
    LimitExceeded,
    HeadersTooLarge,
    UpstreamUnreachable,
    UpstreamError,
    NoHealthyInstance,
    StoreUnavailable,
    CircuitOpen,
    UpstreamTimeout,
    LoopDetected,
}

impl ErrorCode {
    /// The code as it appears in bodies and in `x-switchyard-error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidName => "invalid_name",
            Self::InvalidUrl => "invalid_url",
            Self::InvalidPath => "invalid_path",
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::UpstreamForbidden => "upstream_forbidden",
            Self::ServiceNotFound => "service_not_found",
            Self::InstanceNotFound => "instance_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::BodyTooLarge => "body_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::LimitExceeded => "limit_exceeded",
            Self::HeadersTooLarge => "headers_too_large",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamError => "upstream_error",
            Self::NoHealthyInstance => "no_healthy_instance",
            Self::StoreUnavailable => "store_unavailable",
            Self::CircuitOpen => "circuit_open",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::LoopDetected => "loop_detected",
        }
    }

    /// The HTTP status each code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidJson
            | Self::InvalidName
            | Self::InvalidUrl
            | Self::InvalidPath
            | Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::UpstreamForbidden => StatusCode::FORBIDDEN,
            Self::ServiceNotFound | Self::InstanceNotFound | Self::NotFound => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UpstreamUnreachable | Self::UpstreamError => StatusCode::BAD_GATEWAY,
            Self::NoHealthyInstance | Self::StoreUnavailable | Self::CircuitOpen => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::LoopDetected => StatusCode::LOOP_DETECTED,
        }
    }
}

/// An error the gateway answers itself, with what its response needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    code: ErrorCode,
    message: String,
    allow: Option<&'static str>,
    retry_after_secs: Option<u64>,
}

impl GatewayError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            allow: None,
            retry_after_secs: None,
        }
    }

    /// 405 with the `Allow` header listing the methods the resource takes.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(
                ErrorCode::MethodNotAllowed,
                format!("method not allowed here; allowed: {allow}"),
            )
        }
    }

    /// Adds `Retry-After: <secs>` to the response.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The response: status, JSON body, `x-switchyard-error`, and the extra
    /// headers the code calls for (`Allow`, `Retry-After`, `WWW-Authenticate`).
    pub fn into_response(self) -> Response<Body> {
        let code = self.code.as_str();
        let json = serde_json::json!({ "error": { "code": code, "message": self.message } });
        let mut response = Response::new(body::full(json.to_string()));
        *response.status_mut() = self.code.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(code));
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ErrorCode::Unauthorized {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn error_response_has_json_body_and_header() {
        let response =
            GatewayError::new(ErrorCode::ServiceNotFound, "no service named \"x\"").into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[ERROR_HEADER], "service_not_found");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let json = body_json(response).await;
        assert_eq!(json["error"]["code"], "service_not_found");
        assert_eq!(json["error"]["message"], "no service named \"x\"");
    }

    #[test]
    fn extra_headers_follow_the_code() {
        let r = GatewayError::method_not_allowed("GET, POST").into_response();
        assert_eq!(r.headers()[header::ALLOW], "GET, POST");
        let r = GatewayError::new(ErrorCode::CircuitOpen, "open")
            .with_retry_after(7)
            .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let r = GatewayError::new(ErrorCode::Unauthorized, "no").into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
