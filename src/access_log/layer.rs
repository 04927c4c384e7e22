use tower::Layer;

use super::{AccessLog, AccessSwitch};

/// Wraps a service in [`AccessLog`], logging while `switch` is on.
#[derive(Debug, Clone)]
pub struct AccessLogLayer {
    switch: AccessSwitch,
}

impl AccessLogLayer {
    pub fn new(switch: AccessSwitch) -> Self {
        Self { switch }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog::new(inner, self.switch.clone())
    }
}
