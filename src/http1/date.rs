//! The `Date` field of the messages the gateway writes, formatted once a
//! second per thread rather than once per response.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Writes the `date: ...` field line.
pub fn field(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        super::encode::field(out, "date", text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_imf_fixdate_line() {
        let mut out = Vec::new();
        super::field(&mut out);
        let line = String::from_utf8(out).unwrap();
        let value = line
            .strip_prefix("date: ")
            .and_then(|v| v.strip_suffix("\r\n"))
            .unwrap();
        assert!(httpdate::parse_http_date(value).is_ok(), "{line:?}");
    }
}
