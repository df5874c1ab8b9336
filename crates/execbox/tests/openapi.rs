//! The OpenAPI documents over real HTTP: `/openapi.json` (every surface in one document),
//! `/openapi/execd.json` and `/openapi/leap0.json` are served without a key, parse as
//! OpenAPI 3.x JSON and list the key paths of every surface.

mod common;

use common::TestServer;
use serde_json::Value;

fn document(server: &TestServer, path: &str) -> Value {
    // No key sent: the documents are public, like /health.
    let resp = ureq::get(&server.url(path))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(resp.status(), 200, "GET {path}");
    assert_eq!(resp.content_type(), "application/json", "GET {path}");
    let doc: Value = resp
        .into_json()
        .unwrap_or_else(|e| panic!("GET {path}: not JSON: {e}"));
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3."), "{path}: openapi {version:?}");
    assert!(doc["info"]["title"].is_string(), "{path}: info.title");
    doc
}

fn assert_operations(doc: &Value, wanted: &[(&str, &str)]) {
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in wanted {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("path {path} is not documented"));
        let op = &item[*method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let responses = op["responses"].as_object().expect("responses");
        assert!(!responses.is_empty(), "{method} {path}: no responses");
    }
}

#[test]
fn documents_are_served_and_cover_every_surface() {
    // With a key configured, the documents still need none.
    let server = TestServer::start_with_key("openapi-test-key");
    let doc = document(&server, "/openapi.json");
    assert_operations(
        &doc,
        &[
            // lifecycle
            ("post", "/v1/sandboxes"),
            ("get", "/v1/sandboxes"),
            ("get", "/v1/sandboxes/{id}"),
            ("delete", "/v1/sandboxes/{id}"),
            ("patch", "/v1/sandboxes/{id}/metadata"),
            ("post", "/v1/sandboxes/{id}/pause"),
            ("post", "/v1/sandboxes/{id}/resume"),
            ("post", "/v1/sandboxes/{id}/renew-expiration"),
            ("get", "/v1/sandboxes/{id}/endpoints/{port}"),
            // egress
            ("get", "/v1/sandboxes/{id}/proxy/18080/policy"),
            ("patch", "/v1/sandboxes/{id}/proxy/18080/policy"),
            // isol8
            ("post", "/execute"),
            ("post", "/execute/stream"),
            ("post", "/file"),
            ("get", "/file"),
            ("get", "/sessions"),
            ("delete", "/session/{id}"),
            // session-execute
            ("post", "/api/execute"),
            ("post", "/api/files"),
            ("get", "/api/files"),
            ("post", "/api/processes/kill"),
            // execd and Leap0, as a client calls them: through the proxy
            ("post", "/v1/sandboxes/{sandboxId}/proxy/44772/command"),
            ("get", "/v1/sandboxes/{sandboxId}/proxy/44772/files/info"),
            ("post", "/v1/sandboxes/{sandboxId}/proxy/44772/code"),
            ("get", "/v1/sandboxes/{sandboxId}/proxy/44772/metrics"),
            ("post", "/v1/sandboxes/{sandboxId}/proxy/44772/execute"),
            ("get", "/v1/sandboxes/{sandboxId}/proxy/44772/contexts"),
            ("get", "/health"),
        ],
    );
    // The error envelopes are documented with the statuses the routes answer.
    let create = &doc["paths"]["/v1/sandboxes"]["post"]["responses"];
    assert_eq!(
        create["400"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/ErrorEnvelope"
    );
    let execute = &doc["paths"]["/api/execute"]["post"]["responses"];
    assert_eq!(
        execute["400"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/SessionExecError"
    );
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("securitySchemes");
    for s in ["api_key", "bearer", "access_token"] {
        assert!(schemes.contains_key(s), "security scheme {s}");
    }
    // Every reference resolves.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let text = doc.to_string();
    for part in text.split("#/components/schemas/").skip(1) {
        let name: String = part.chars().take_while(|c| *c != '"').collect();
        assert!(
            schemas.contains_key(&name),
            "schema {name} is referenced, not defined"
        );
    }

    let execd = document(&server, "/openapi/execd.json");
    assert_eq!(
        execd["servers"][0]["url"],
        "/v1/sandboxes/{sandboxId}/proxy/44772"
    );
    assert_operations(
        &execd,
        &[
            ("get", "/ping"),
            ("post", "/command"),
            ("get", "/command/status/{id}"),
            ("post", "/session"),
            ("post", "/code/context"),
            ("get", "/files/download"),
            ("post", "/files/upload"),
            ("get", "/directories/list"),
            ("post", "/pty"),
        ],
    );
    let leap0 = document(&server, "/openapi/leap0.json");
    assert_operations(
        &leap0,
        &[
            ("get", "/healthz"),
            ("post", "/execute"),
            ("post", "/execute/async"),
            ("post", "/contexts"),
            ("delete", "/contexts/{id}"),
        ],
    );
    // The lifecycle API itself still wants the key.
    let (status, _) = server.get("/v1/sandboxes");
    assert_eq!(status, 401);
}
