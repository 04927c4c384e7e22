//! The registry API end to end (SPEC §3, §4): every endpoint, its JSON
//! shapes, and every bad input answered with its error and changing nothing.

mod common;

use common::{TestGateway, Upstream, response};
use http::{Method, StatusCode};
use serde_json::json;

/// Health checks off: these tests are about the API, not about timing.
const QUIET: &str = "[health_check]\ninterval = \"0s\"\n";

#[tokio::test]
async fn register_list_get_and_delete() {
    let gw = TestGateway::start(QUIET).await;

    let reply = gw
        .post_json(
            "/services",
            &json!({"name": "user-service", "url": "http://localhost:8081"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.header("location"),
        Some("/services/user-service/instances/localhost:8081")
    );
    let instance = reply.json();
    assert_eq!(instance["id"], "localhost:8081");
    assert_eq!(instance["service"], "user-service");
    assert_eq!(instance["url"], "http://localhost:8081");
    assert_eq!(instance["status"], "unknown");
    assert_eq!(instance["last_ping"], serde_json::Value::Null);
    assert_eq!(instance["metadata"], json!({}));
    assert_eq!(instance["circuit"], "closed");
    assert_eq!(instance["consecutive_failures"], 0);
    let registered_at = instance["registered_at"].as_str().unwrap();
    assert!(
        registered_at.ends_with('Z') && registered_at.contains('T'),
        "{registered_at}"
    );
    // SPEC §7: every instance explains whether it takes requests.
    assert_eq!(instance["state"], "active");
    assert_eq!(instance["routable"], true);
    assert_eq!(instance["reason"], serde_json::Value::Null);
    assert_eq!(instance["last_check"], serde_json::Value::Null);
    let keys: Vec<_> = instance.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys.len(), 13, "{keys:?}");

    // The same (name, id) again is 200 and adds nothing.
    let again = gw
        .post_json(
            "/services",
            &json!({"name": "user-service", "url": "http://localhost:8081"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["registered_at"], instance["registered_at"]);

    // Same name, another URL: a second instance.
    gw.register("user-service", "http://localhost:8082").await;
    gw.register("billing", "http://10.1.2.3:9000/api/").await;

    let list = gw.get("/services").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.header("content-type"), Some("application/json"));
    let list = list.json();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(
        names,
        [json!("billing"), json!("user-service")],
        "sorted by name"
    );

    let service = gw.get("/services/user-service").await;
    assert_eq!(service.status, StatusCode::OK);
    let service = service.json();
    assert_eq!(service["status"], "unknown");
    let ids: Vec<_> = service["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].clone())
        .collect();
    assert_eq!(ids, [json!("localhost:8081"), json!("localhost:8082")]);

    // The Location of a registration can be read back, encoded or not.
    let one = gw
        .get("/services/user-service/instances/localhost:8082")
        .await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json()["url"], "http://localhost:8082");
    let encoded = gw
        .get("/services/user-service/instances/localhost%3A8082")
        .await;
    assert_eq!(encoded.status, StatusCode::OK);
    assert_eq!(
        gw.get("/services/user-service/instances")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let deleted = gw
        .delete("/services/user-service/instances/localhost:8081")
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(deleted.body.is_empty());
    let service = gw.get("/services/user-service").await.json();
    assert_eq!(service["instances"].as_array().unwrap().len(), 1);

    assert_eq!(
        gw.delete("/services/billing").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        gw.get("/services/billing").await.error_code(),
        "service_not_found"
    );

    // Removing the last instance removes the service.
    assert_eq!(
        gw.delete("/services/user-service/instances/localhost:8082")
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(gw.get("/services").await.json(), json!([]));
    assert_eq!(gw.gateway.registry().instance_count(), 0);
}

#[tokio::test]
async fn explicit_id_and_metadata() {
    let gw = TestGateway::start(QUIET).await;
    let body = json!({"name": "orders", "url": "http://127.0.0.1:7001", "id": "orders-1", "metadata": {"zone": "a", "version": "1.2"}});
    let reply = gw.post_json("/services", &body).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.header("location"),
        Some("/services/orders/instances/orders-1")
    );
    assert_eq!(
        reply.json()["metadata"],
        json!({"zone": "a", "version": "1.2"})
    );

    // Re-registering refreshes the metadata and answers 200.
    let body = json!({"name": "orders", "url": "http://127.0.0.1:7001", "id": "orders-1", "metadata": {"zone": "b"}});
    let reply = gw.post_json("/services", &body).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["metadata"], json!({"zone": "b"}));

    // The same id with a new URL moves the instance.
    let body = json!({"name": "orders", "url": "http://127.0.0.1:7002", "id": "orders-1"});
    let reply = gw.post_json("/services", &body).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["url"], "http://127.0.0.1:7002");
    let service = gw.get("/services/orders").await.json();
    assert_eq!(service["instances"].as_array().unwrap().len(), 1);
    assert_eq!(gw.gateway.registry().instance_count(), 1);
}

/// Method, path, body, headers, expected status and error code.
type BadInput<'a> = (
    Method,
    &'a str,
    String,
    Vec<(&'a str, &'a str)>,
    u16,
    &'a str,
);

#[tokio::test]
async fn every_bad_input_is_refused_and_changes_nothing() {
    let gw = TestGateway::start(QUIET).await;
    gw.register("keep", "http://127.0.0.1:7001").await;
    let before = gw.get("/services").await.json();

    let json_ct = [("content-type", "application/json")];
    let cases: Vec<BadInput> = vec![
        (
            Method::POST,
            "/services",
            "{".into(),
            json_ct.to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/services",
            "".into(),
            json_ct.to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/services",
            "[]".into(),
            json_ct.to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"a"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/services",
            r#"{"url":"http://h:1"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":1,"url":"http://h:1"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"a","url":"http://h:1","metadata":{"k":1}}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"Bad","url":"http://h:1"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_name",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"","url":"http://h:1"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_name",
        ),
        (
            Method::POST,
            "/services",
            format!(r#"{{"name":"{}","url":"http://h:1"}}"#, "a".repeat(64)),
            json_ct.to_vec(),
            400,
            "invalid_name",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"http://h:1","id":"a/b"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_name",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"localhost:8081"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_url",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"https://h:1"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_url",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"http://u:p@h:1"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_url",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"http://h:1/?q=1"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_url",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"http://h:1/#f"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_url",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"http://h:70000"}"#.into(),
            json_ct.to_vec(),
            400,
            "invalid_url",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"http://h:1"}"#.into(),
            vec![("content-type", "text/plain")],
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/services",
            r#"{"name":"keep","url":"http://h:1"}"#.into(),
            vec![("content-type", "application/x-www-form-urlencoded")],
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/services",
            format!(
                r#"{{"name":"keep","url":"http://h:1","metadata":{{"k":"{}"}}}}"#,
                "x".repeat(70_000)
            ),
            json_ct.to_vec(),
            413,
            "body_too_large",
        ),
        (
            Method::PUT,
            "/services",
            "".into(),
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/services/keep",
            "".into(),
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/services/keep/health",
            "".into(),
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::PUT,
            "/services/keep/instances/127.0.0.1:7001",
            "".into(),
            vec![],
            405,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/services/nope",
            "".into(),
            vec![],
            404,
            "service_not_found",
        ),
        (
            Method::GET,
            "/services/nope/health",
            "".into(),
            vec![],
            404,
            "service_not_found",
        ),
        (
            Method::DELETE,
            "/services/nope",
            "".into(),
            vec![],
            404,
            "service_not_found",
        ),
        (
            Method::DELETE,
            "/services/keep/instances/nope:1",
            "".into(),
            vec![],
            404,
            "instance_not_found",
        ),
        (
            Method::DELETE,
            "/services/nope/instances/x",
            "".into(),
            vec![],
            404,
            "service_not_found",
        ),
        (
            Method::GET,
            "/services/keep/instances/nope:1",
            "".into(),
            vec![],
            404,
            "instance_not_found",
        ),
        (
            Method::GET,
            "/services/keep/unknown",
            "".into(),
            vec![],
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/nothing-here",
            "".into(),
            vec![],
            404,
            "not_found",
        ),
        (
            Method::POST,
            "/healthz",
            "".into(),
            vec![],
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, body, headers, status, code) in cases {
        let reply = gw.request(method.clone(), path, &body, &headers).await;
        assert_eq!(
            reply.status.as_u16(),
            status,
            "{method} {path} {body:.80}: {}",
            reply.text()
        );
        assert_eq!(reply.error_code(), code, "{method} {path} {body:.80}");
        if status == 405 {
            assert!(
                reply.header("allow").is_some_and(|a| a.contains("GET")),
                "{method} {path}"
            );
        }
    }
    assert_eq!(gw.get("/services").await.json(), before);
}

#[tokio::test]
async fn oversized_chunked_body_is_refused_without_a_length() {
    let gw = TestGateway::start(QUIET).await;
    // A body with no Content-Length: the limit applies as it streams in.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = http::Request::post(gw.url("/services"))
        .header("content-type", "application/json")
        .body(common::Chunks::new(20, 8192))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(response.headers()["x-switchyard-error"], "body_too_large");
    assert_eq!(gw.get("/services").await.json(), json!([]));
}

#[tokio::test]
async fn healthz_answers_ok() {
    let gw = TestGateway::start(QUIET).await;
    let reply = gw.get("/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({"status": "ok"}));
}

#[tokio::test]
async fn static_services_are_registered_at_start() {
    let up = Upstream::start(|_| async { response(200, "ok") }).await;
    let config = format!(
        "{QUIET}[[services]]\nname = \"user-service\"\nurls = [\"{}\", \"http://127.0.0.1:9/base\"]\n",
        up.url()
    );
    let gw = TestGateway::start(&config).await;
    let service = gw.get("/services/user-service").await;
    assert_eq!(service.status, StatusCode::OK);
    let urls: Vec<_> = service.json()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["url"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(urls, [up.url(), "http://127.0.0.1:9/base".to_string()]);
}
