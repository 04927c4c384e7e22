//! Property tests of the validators that stand between clients and
//! upstreams: service names, instance ids and URLs, the `/call` path rules,
//! and IP-literal recognition for the upstream policy.

use http::Uri;
use proptest::prelude::*;
use switchyard::error::ErrorCode;
use switchyard::proxy::path::CallTarget;
use switchyard::registry::validate::{self, InstanceUrl};
use switchyard::upstream::policy::ip_literal;

/// What a path means once decoded a single time: its segments, counting `/`
/// and `\` as separators. A `.` or `..` among them could climb out of the
/// instance's base path.
fn climbs_when_decoded(rest: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
    decoded
        .split(['/', '\\'])
        .any(|segment| segment == "." || segment == "..")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn valid_names_are_accepted(name in "[a-z0-9][a-z0-9._-]{0,62}") {
        prop_assert!(validate::service_name(&name).is_ok());
    }

    #[test]
    fn accepted_names_are_clean_path_segments(name in "\\PC{0,70}") {
        if validate::service_name(&name).is_ok() {
            prop_assert!((1..=63).contains(&name.len()));
            prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
            prop_assert!(name.as_bytes()[0].is_ascii_alphanumeric());
        }
    }

    #[test]
    fn accepted_ids_need_no_escaping_and_are_not_dot_segments(id in "\\PC{0,40}") {
        if validate::instance_id(&id).is_ok() {
            prop_assert!(id != "." && id != "..");
            prop_assert!(!id.contains('/') && !id.contains('%') && !id.contains('?') && !id.contains('#'));
        }
    }

    #[test]
    fn call_paths_are_refused_exactly_when_they_could_climb(
        rest in "(/|\\\\|\\.|%2[eEfF]|%5[cC]|%|a|2|e|E|f|F|5|c){0,24}"
    ) {
        let Ok(uri) = format!("/call/svc/{rest}").parse::<Uri>() else {
            return Ok(());
        };
        let rest = uri.path().strip_prefix("/call/svc").unwrap_or_default().to_string();
        match CallTarget::parse(&uri) {
            Ok(target) => {
                prop_assert_eq!(target.rest, rest.as_str(), "forwarded byte for byte");
                prop_assert!(!climbs_when_decoded(&rest), "{rest:?} let through");
            }
            Err(e) => {
                prop_assert_eq!(e.code(), ErrorCode::InvalidPath);
                prop_assert!(climbs_when_decoded(&rest), "{rest:?} refused for nothing");
            }
        }
    }

    #[test]
    fn url_parsing_never_panics_and_accepted_urls_are_usable(url in "(http://)?\\PC{0,40}") {
        if let Ok(parsed) = InstanceUrl::parse(&url) {
            let target = parsed.target("/x", Some("q=1")).concat();
            prop_assert!(http::uri::PathAndQuery::try_from(target).is_ok());
            prop_assert!(parsed.host_port().contains(':'));
            prop_assert!(validate::instance_id(parsed.host_port()).is_ok(), "default id {:?}", parsed.host_port());
        }
    }

    #[test]
    fn ipv4_in_any_spelling_is_recognised(ip: u32) {
        let v4 = std::net::Ipv4Addr::from(ip);
        let [a, b, c, d] = v4.octets();
        for spelling in [
            v4.to_string(),
            ip.to_string(),
            format!("{ip:#x}"),
            format!("0{ip:o}"),
            format!("{a}.{}", u32::from(b) << 16 | u32::from(c) << 8 | u32::from(d)),
            format!("{a}.{b}.{}", u32::from(c) << 8 | u32::from(d)),
        ] {
            prop_assert_eq!(ip_literal(&spelling), Some(std::net::IpAddr::V4(v4)), "{}", spelling);
        }
    }

    #[test]
    fn ip_recognition_never_panics(host in "\\PC{0,30}") {
        let _ = ip_literal(&host);
    }
}
