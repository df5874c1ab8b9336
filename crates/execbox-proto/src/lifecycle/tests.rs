//! Unit tests of the lifecycle wire types, parsing and validation.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use time::macros::datetime;

use super::*;

const HOST_ARCH: &str = "amd64";
const MAX_TIMEOUT: u64 = 86_400;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The body the Python SDK sends by default.
fn sdk_body() -> Value {
    json!({
        "image": {"uri": "python:3.11"},
        "entrypoint": ["tail", "-f", "/dev/null"],
        "resourceLimits": {"cpu": "1", "memory": "2Gi"},
        "timeout": 600,
        "env": {},
        "metadata": {},
        "extensions": {}
    })
}

fn parse(v: &Value) -> Result<CreateSandboxRequest, ValidationError> {
    parse_create_request(v.to_string().as_bytes())
}

/// Parses and validates `v`, returning the error.
fn invalid(v: Value) -> ValidationError {
    match parse(&v).and_then(|r| r.validate(MAX_TIMEOUT, HOST_ARCH)) {
        Ok(ok) => panic!("expected an error for {v}, got {ok:?}"),
        Err(e) => e,
    }
}

/// The SDK body with `key` replaced by `value`.
fn with(key: &str, value: Value) -> Value {
    let mut body = sdk_body();
    body[key] = value;
    body
}

fn with_limits(limits: Value) -> Value {
    with("resourceLimits", limits)
}

// ---- wire types -------------------------------------------------------------------------------

#[test]
fn sandbox_object_serializes_exactly() {
    let sbx = Sandbox {
        id: "sbx-1".into(),
        image: Some(ImageSpec {
            uri: "python:3.11".into(),
            auth: None,
        }),
        snapshot_id: None,
        status: SandboxStatus {
            state: SandboxState::Running,
            reason: Some("r".into()),
            message: Some("m".into()),
            last_transition_at: Some(datetime!(2026-01-01 00:00:00 UTC)),
        },
        metadata: Some(map(&[("project", "demo")])),
        entrypoint: vec!["tail".into(), "-f".into(), "/dev/null".into()],
        expires_at: Some(datetime!(2026-01-01 00:10:00 UTC)),
        created_at: datetime!(2026-01-01 00:00:00 UTC),
        platform: Some(Platform {
            os: Some("linux".into()),
            arch: Some("amd64".into()),
        }),
    };
    let expected = r#"{"id":"sbx-1","image":{"uri":"python:3.11"},"status":{"state":"Running","reason":"r","message":"m","lastTransitionAt":"2026-01-01T00:00:00Z"},"metadata":{"project":"demo"},"entrypoint":["tail","-f","/dev/null"],"expiresAt":"2026-01-01T00:10:00Z","createdAt":"2026-01-01T00:00:00Z","platform":{"os":"linux","arch":"amd64"}}"#;
    assert_eq!(serde_json::to_string(&sbx).unwrap(), expected);
    let back: Sandbox = serde_json::from_str(expected).unwrap();
    assert_eq!(back, sbx);
}

#[test]
fn sandbox_omits_nulls() {
    let sbx = Sandbox {
        id: "sbx-2".into(),
        image: None,
        snapshot_id: Some("snap-1".into()),
        status: SandboxStatus::new(SandboxState::Pending),
        metadata: None,
        entrypoint: vec!["sh".into()],
        expires_at: None,
        created_at: datetime!(2026-01-01 00:00:00.5 UTC),
        platform: None,
    };
    assert_eq!(
        serde_json::to_string(&sbx).unwrap(),
        r#"{"id":"sbx-2","snapshotId":"snap-1","status":{"state":"Pending"},"entrypoint":["sh"],"createdAt":"2026-01-01T00:00:00.500Z"}"#
    );
    let resp = CreateSandboxResponse::from(sbx);
    assert_eq!(
        serde_json::to_string(&resp).unwrap(),
        r#"{"id":"sbx-2","status":{"state":"Pending"},"createdAt":"2026-01-01T00:00:00.500Z","entrypoint":["sh"]}"#
    );
}

#[test]
fn sandbox_input_tolerates_nulls_and_unknown_fields() {
    let v = json!({"id":"x","image":null,"status":{"state":"Paused","reason":null,"extra":1},
        "entrypoint":["a"],"expiresAt":null,"createdAt":"2026-01-01T01:00:00+01:00","future":true});
    let s: Sandbox = serde_json::from_value(v).unwrap();
    assert_eq!(s.status.state, SandboxState::Paused);
    assert_eq!(s.expires_at, None);
    assert_eq!(s.created_at, datetime!(2026-01-01 00:00:00 UTC));
}

#[test]
fn create_response_order() {
    let resp = CreateSandboxResponse {
        id: "a".into(),
        status: SandboxStatus::new(SandboxState::Pending),
        metadata: Some(map(&[("name", "n")])),
        platform: None,
        expires_at: Some(datetime!(2026-01-01 00:10:00 UTC)),
        created_at: datetime!(2026-01-01 00:00:00 UTC),
        entrypoint: vec!["x".into()],
    };
    assert_eq!(
        serde_json::to_string(&resp).unwrap(),
        r#"{"id":"a","status":{"state":"Pending"},"metadata":{"name":"n"},"expiresAt":"2026-01-01T00:10:00Z","createdAt":"2026-01-01T00:00:00Z","entrypoint":["x"]}"#
    );
}

#[test]
fn list_response_and_pagination() {
    let resp = ListSandboxesResponse {
        items: vec![],
        pagination: Pagination::new(1, 20, 3),
    };
    assert_eq!(
        serde_json::to_string(&resp).unwrap(),
        r#"{"items":[],"pagination":{"page":1,"pageSize":20,"totalItems":3,"totalPages":1,"hasNextPage":false}}"#
    );
    let p = Pagination::new(2, 10, 25);
    assert_eq!((p.total_pages, p.has_next_page), (3, true));
    assert_eq!(p.range(), 10..20);
    assert_eq!(Pagination::new(3, 10, 25).range(), 20..25);
    assert_eq!(Pagination::new(9, 10, 25).range(), 25..25);
    let empty = Pagination::new(1, 20, 0);
    assert_eq!((empty.total_pages, empty.has_next_page), (0, false));
}

#[test]
fn renew_and_endpoint() {
    let req = parse_renew_request(br#"{"expiresAt":"2026-01-01T02:00:00.123456+02:00"}"#).unwrap();
    assert_eq!(req.expires_at, datetime!(2026-01-01 00:00:00.123456 UTC));
    let resp = RenewExpirationResponse {
        expires_at: req.expires_at,
    };
    assert_eq!(
        serde_json::to_string(&resp).unwrap(),
        r#"{"expiresAt":"2026-01-01T00:00:00.123Z"}"#
    );
    let e = parse_renew_request(br#"{"expiresAt":"soon"}"#).unwrap_err();
    assert_eq!(e.field, "expiresAt");
    let e = parse_renew_request(br#"{"expiresAt":5}"#).unwrap_err();
    assert_eq!(
        e.to_string(),
        "expiresAt: invalid type: number, expected a string"
    );
    let e = parse_renew_request(b"{}").unwrap_err();
    assert_eq!(e.to_string(), "expiresAt: missing required field");

    let ep = Endpoint {
        endpoint: "127.0.0.1:8080/v1/sandboxes/s/proxy/44772".into(),
        headers: Some(map(&[("X-EXECD-ACCESS-TOKEN", "t")])),
    };
    assert_eq!(
        serde_json::to_string(&ep).unwrap(),
        r#"{"endpoint":"127.0.0.1:8080/v1/sandboxes/s/proxy/44772","headers":{"X-EXECD-ACCESS-TOKEN":"t"}}"#
    );
    let bare = Endpoint {
        endpoint: "h".into(),
        headers: None,
    };
    assert_eq!(serde_json::to_string(&bare).unwrap(), r#"{"endpoint":"h"}"#);
}

#[test]
fn error_envelope() {
    assert_eq!(
        serde_json::to_string(&ErrorEnvelope::missing_api_key()).unwrap(),
        r#"{"code":"MISSING_API_KEY","message":"Authentication credentials are missing. Provide API key via OPEN-SANDBOX-API-KEY header."}"#
    );
    assert_eq!(
        serde_json::to_string(&ErrorEnvelope::invalid_api_key()).unwrap(),
        r#"{"code":"INVALID_API_KEY","message":"Authentication credentials are invalid. Check your API key and try again."}"#
    );
    assert_eq!(
        serde_json::to_string(&ErrorEnvelope::new(ErrorCode::InvalidParameter, "")).unwrap(),
        r#"{"code":"SANDBOX::INVALID_PARAMETER","message":""}"#
    );
    let codes = [
        (
            ErrorCode::InvalidParameter,
            "SANDBOX::INVALID_PARAMETER",
            400,
        ),
        (
            ErrorCode::InvalidMetadataLabel,
            "SANDBOX::INVALID_METADATA_LABEL",
            400,
        ),
        (
            ErrorCode::ApiNotSupported,
            "SANDBOX::API_NOT_SUPPORTED",
            501,
        ),
        (ErrorCode::UnknownError, "SANDBOX::UNKNOWN_ERROR", 500),
        (
            ErrorCode::InvalidMetadataFormat,
            "INVALID_METADATA_FORMAT",
            400,
        ),
        (ErrorCode::SandboxNotFound, "DOCKER::SANDBOX_NOT_FOUND", 404),
        (
            ErrorCode::SandboxNotRunning,
            "DOCKER::SANDBOX_NOT_RUNNING",
            409,
        ),
        (
            ErrorCode::SandboxNotPaused,
            "DOCKER::SANDBOX_NOT_PAUSED",
            409,
        ),
        (
            ErrorCode::InvalidExpiration,
            "DOCKER::INVALID_EXPIRATION",
            400,
        ),
        (
            ErrorCode::ExpirationNotExtended,
            "DOCKER::EXPIRATION_NOT_EXTENDED",
            409,
        ),
        (ErrorCode::InvalidPort, "DOCKER::INVALID_PORT", 400),
        (ErrorCode::MissingApiKey, "MISSING_API_KEY", 401),
        (ErrorCode::InvalidApiKey, "INVALID_API_KEY", 401),
        (
            ErrorCode::GeneralUnknownError,
            "GENERAL::UNKNOWN_ERROR",
            500,
        ),
    ];
    for (code, s, status) in codes {
        assert_eq!(code.as_str(), s);
        assert_eq!(code.to_string(), s);
        assert_eq!(code.http_status(), status);
    }
    let env: ErrorEnvelope = ValidationError::new("timeout", "too short").into();
    assert_eq!(env.code, "SANDBOX::INVALID_PARAMETER");
    assert_eq!(env.message, "timeout: too short");
    let env = ValidationError::new("metadata.a", "bad").to_envelope();
    assert_eq!(env.code, "SANDBOX::INVALID_METADATA_LABEL");
}

#[test]
fn states() {
    for st in SandboxState::ALL {
        assert_eq!(st.to_string().parse::<SandboxState>(), Ok(st));
        assert_eq!(
            serde_json::to_value(st).unwrap(),
            Value::String(st.to_string())
        );
    }
    assert_eq!("running".parse::<SandboxState>(), Ok(SandboxState::Running));
    assert!("Exploded".parse::<SandboxState>().is_err());
    assert!(serde_json::from_str::<SandboxState>(r#""running""#).is_err());
    assert!(SandboxState::Terminated.is_final());
    assert!(!SandboxState::Paused.is_final());
}

#[test]
fn secrets_are_redacted_in_debug() {
    let auth = ImageAuth {
        username: "u".into(),
        password: "hunter2".into(),
    };
    assert!(!format!("{auth:?}").contains("hunter2"));
    let oss = OssfsVolume {
        access_key_secret: "s3cr3t".into(),
        ..Default::default()
    };
    assert!(!format!("{oss:?}").contains("s3cr3t"));
    let img = ImageSpec {
        uri: "x".into(),
        auth: Some(auth),
    };
    assert_eq!(img.without_auth().auth, None);
}

// ---- body parsing -----------------------------------------------------------------------------

#[test]
fn sdk_default_body_parses_and_validates() {
    let req = parse(&sdk_body()).unwrap();
    assert_eq!(req.image.as_ref().unwrap().uri, "python:3.11");
    assert_eq!(req.timeout, Some(600));
    let v = req.validate(MAX_TIMEOUT, HOST_ARCH).unwrap();
    assert_eq!(v.cpu_millicores, Some(1000));
    assert_eq!(v.memory_bytes, Some(2 << 30));
    assert_eq!(v.timeout_secs, Some(600));
    assert_eq!(v.entrypoint, ["tail", "-f", "/dev/null"]);
    assert_eq!(
        (v.pids, v.disk_bytes, v.pool_ref.as_deref()),
        (None, None, None)
    );
}

#[test]
fn full_body_round_trips() {
    let body = json!({
        "image": {"uri": "python:3.11", "auth": {"username": "u", "password": "p"}},
        "entrypoint": ["python", "-m", "http.server"],
        "timeout": 3600,
        "resourceLimits": {"cpu": "500m", "memory": "512Mi", "pids": "256", "disk": "1Gi"},
        "env": {"A": "1"},
        "metadata": {"project": "demo", "example.com/team": "ml"},
        "platform": {"os": "linux", "arch": "amd64"},
        "networkPolicy": {"defaultAction": "deny", "egress": [
            {"action": "allow", "target": "pypi.org"},
            {"action": "allow", "target": "*.pythonhosted.org"}]},
        "credentialProxy": {"enabled": true},
        "secureAccess": true,
        "volumes": [
            {"name": "data", "mountPath": "/data", "readOnly": true, "subPath": "a/b", "host": {"path": "/srv/data"}},
            {"name": "pv", "mountPath": "/pv", "pvc": {"claimName": "claim-1", "createIfNotExists": true, "accessModes": ["ReadWriteOnce"]}},
            {"name": "oss", "mountPath": "/oss", "ossfs": {"bucket": "b", "endpoint": "e", "accessKeyId": "i", "accessKeySecret": "s", "options": ["allow_other"]}}
        ],
        "extensions": {"access.renew.extend.seconds": "600"}
    });
    let req = parse(&body).unwrap();
    assert_eq!(serde_json::to_value(&req).unwrap(), body);
    let v = req.validate(MAX_TIMEOUT, "x86_64").unwrap();
    assert_eq!(v.cpu_millicores, Some(500));
    assert_eq!(v.memory_bytes, Some(512 << 20));
    assert_eq!(v.pids, Some(256));
    assert_eq!(v.disk_bytes, Some(1 << 30));
    assert_eq!(v.timeout_secs, Some(3600));
    assert_eq!(v.renew_extend_secs, Some(600));
    assert_eq!(
        req.network_policy.unwrap().default_action,
        Some(NetworkAction::Deny)
    );
}

#[test]
fn nulls_are_absent_and_unknown_fields_ignored() {
    let mut body = sdk_body();
    body["timeout"] = Value::Null;
    body["snapshotId"] = Value::Null;
    body["platform"] = Value::Null;
    body["somethingNew"] = json!({"x": 1});
    let req = parse(&body).unwrap();
    assert_eq!(req.timeout, None);
    assert_eq!(req.snapshot_id, None);
    let v = req.validate(MAX_TIMEOUT, HOST_ARCH).unwrap();
    assert_eq!(v.timeout_secs, None);
    // Serializing omits the nulls.
    let out = serde_json::to_value(&req).unwrap();
    assert!(out.get("timeout").is_none());
    assert!(out.get("somethingNew").is_none());
}

#[test]
fn malformed_json() {
    let e = parse_create_request(b"{\"image\": ").unwrap_err();
    assert_eq!(e.field, "");
    assert!(e.message.starts_with("malformed JSON:"), "{e}");
    let e = parse_create_request(b"").unwrap_err();
    assert!(e.message.starts_with("malformed JSON:"), "{e}");
    let e = parse_create_request(b"[1,2]").unwrap_err();
    assert_eq!(
        e.to_string(),
        "request body must be a JSON object, not array"
    );
    assert_eq!(e.error_code(), ErrorCode::InvalidParameter);
}

#[test]
fn wrong_types_name_the_field() {
    let cases = [
        (with("timeout", json!("600")), "timeout: invalid type: string, expected an integer"),
        (with("timeout", json!(60.5)), "timeout: invalid value: 60.5, expected an integer"),
        (with("image", json!("python")), "image: invalid type: string, expected an object"),
        (with("image", json!({})), "image.uri: missing required field"),
        (with("image", json!({"uri": 1})), "image.uri: invalid type: number, expected a string"),
        (with("entrypoint", json!("sh")), "entrypoint: invalid type: string, expected an array"),
        (with("entrypoint", json!(["sh", 1])), "entrypoint[1]: invalid type: number, expected a string"),
        (with("env", json!({"A": 1})), "env.A: invalid type: number, expected a string"),
        (with("env", json!({"A": null})), "env.A: invalid type: null, expected a string"),
        (with("resourceLimits", json!({"cpu": 1})), "resourceLimits.cpu: invalid type: number, expected a string"),
        (with("metadata", json!({"k": true})), "metadata.k: invalid type: boolean, expected a string"),
        (with("secureAccess", json!("yes")), "secureAccess: invalid type: string, expected a boolean"),
        (with("platform", json!({"os": 1})), "platform.os: invalid type: number, expected a string"),
        (
            with("networkPolicy", json!({"egress": [{"action": "maybe", "target": "a.com"}]})),
            "networkPolicy.egress[0].action: invalid value: \"maybe\", expected \"allow\" or \"deny\"",
        ),
        (
            with("networkPolicy", json!({"egress": [{"action": "allow"}]})),
            "networkPolicy.egress[0].target: missing required field",
        ),
        (with("credentialProxy", json!({"enabled": "true"})), "credentialProxy.enabled: invalid type: string, expected a boolean"),
        (with("volumes", json!([{"name": "a"}])), "volumes[0].mountPath: missing required field"),
        (
            with("volumes", json!([{"name": "a", "mountPath": "/a", "pvc": {"claimName": "c", "accessModes": "RWO"}}])),
            "volumes[0].pvc.accessModes: invalid type: string, expected an array",
        ),
        (with("extensions", json!({"poolRef": 3})), "extensions.poolRef: invalid type: number, expected a string"),
    ];
    for (body, expected) in cases {
        let e = parse(&body).unwrap_err();
        assert_eq!(e.to_string(), expected, "body {body}");
    }
    // Metadata type errors map to the metadata-label code.
    let e = parse(&with("metadata", json!([]))).unwrap_err();
    assert_eq!(e.error_code(), ErrorCode::InvalidMetadataLabel);
}

// ---- validation -------------------------------------------------------------------------------

#[test]
fn bad_resource_limits() {
    let e = invalid(with_limits(json!({"cpu": "1", "memory": "lots"})));
    assert_eq!(e.field, "resourceLimits.memory");
    let e = invalid(with_limits(json!({"cpu": "-1", "memory": "1Gi"})));
    assert_eq!(e.field, "resourceLimits.cpu");
    assert!(e.message.contains("negative"), "{e}");
    let e = invalid(with_limits(json!({"cpu": "0", "memory": "1Gi"})));
    assert_eq!(e.field, "resourceLimits.cpu");
    assert!(e.message.contains("greater than zero"), "{e}");
    let e = invalid(with_limits(json!({"cpu": "2000"})));
    assert_eq!(e.field, "resourceLimits.cpu");
    let e = invalid(with_limits(json!({"memory": "512m"})));
    assert_eq!(e.field, "resourceLimits.memory");
    let e = invalid(with_limits(json!({"cpu": "1", "gpu": "1"})));
    assert_eq!(e.field, "resourceLimits.gpu");
    assert!(e.message.contains("GPUs are not supported"), "{e}");
    let e = invalid(with_limits(json!({"nvidia.com/gpu": "1"})));
    assert_eq!(e.field, "resourceLimits.nvidia.com/gpu");
    let e = invalid(with_limits(json!({"hugepages": "1"})));
    assert_eq!(e.field, "resourceLimits.hugepages");
    for pids in ["0", "-1", "many", "1.5", "99999999"] {
        let e = invalid(with_limits(json!({"pids": pids})));
        assert_eq!(e.field, "resourceLimits.pids", "{pids}");
    }
    let e = invalid(with_limits(
        json!({"disk": "1Gi", "ephemeral-storage": "1Gi"}),
    ));
    assert!(e.field.starts_with("resourceLimits."), "{e}");
    let e = invalid(with_limits(json!({"ephemeral-storage": "0"})));
    assert_eq!(e.field, "resourceLimits.ephemeral-storage");
}

#[test]
fn good_resource_limits() {
    let req = parse(&with_limits(
        json!({"cpu": "1.5", "memory": "1G", "ephemeral-storage": "10Gi", "gpu": "0"}),
    ))
    .unwrap();
    let v = req.validate(MAX_TIMEOUT, HOST_ARCH).unwrap();
    assert_eq!(v.cpu_millicores, Some(1500));
    assert_eq!(v.memory_bytes, Some(1_000_000_000));
    assert_eq!(v.disk_bytes, Some(10 << 30));
    // Empty limits are accepted (server defaults apply).
    let v = parse(&with_limits(json!({})))
        .unwrap()
        .validate(MAX_TIMEOUT, HOST_ARCH)
        .unwrap();
    assert_eq!(v.cpu_millicores, None);
}

#[test]
fn resource_limits_required_unless_pool() {
    let mut body = sdk_body();
    body.as_object_mut().unwrap().remove("resourceLimits");
    let e = invalid(body.clone());
    assert_eq!(e.field, "resourceLimits");
    body["extensions"] = json!({"poolRef": "warm"});
    let v = parse(&body)
        .unwrap()
        .validate(MAX_TIMEOUT, HOST_ARCH)
        .unwrap();
    assert_eq!(v.pool_ref.as_deref(), Some("warm"));
    body["extensions"] = json!({"poolRef": ""});
    assert_eq!(invalid(body).field, "extensions.poolRef");
}

#[test]
fn timeout_rules() {
    let e = invalid(with("timeout", json!(30)));
    assert_eq!(e.field, "timeout");
    assert!(e.message.contains("at least 60"), "{e}");
    assert_eq!(invalid(with("timeout", json!(-5))).field, "timeout");
    assert_eq!(invalid(with("timeout", json!(0))).field, "timeout");
    let e = invalid(with("timeout", json!(MAX_TIMEOUT + 1)));
    assert!(e.message.contains("at most 86400"), "{e}");
    for ok in [60, MAX_TIMEOUT] {
        let v = parse(&with("timeout", json!(ok)))
            .unwrap()
            .validate(MAX_TIMEOUT, HOST_ARCH)
            .unwrap();
        assert_eq!(v.timeout_secs, Some(ok));
    }
}

#[test]
fn source_and_entrypoint_rules() {
    let e = invalid(with("snapshotId", json!("snap-1")));
    assert_eq!(e.field, "image");
    let mut body = sdk_body();
    body.as_object_mut().unwrap().remove("image");
    assert_eq!(invalid(body.clone()).field, "image");
    assert_eq!(
        invalid(with("image", json!({"uri": " "}))).field,
        "image.uri"
    );

    // Snapshot restore: entrypoint defaults.
    body["snapshotId"] = json!("snap-1");
    body.as_object_mut().unwrap().remove("entrypoint");
    let v = parse(&body)
        .unwrap()
        .validate(MAX_TIMEOUT, HOST_ARCH)
        .unwrap();
    assert_eq!(v.entrypoint, DEFAULT_ENTRYPOINT);
    body["snapshotId"] = json!("");
    assert_eq!(invalid(body).field, "snapshotId");

    let mut body = sdk_body();
    body.as_object_mut().unwrap().remove("entrypoint");
    assert_eq!(invalid(body).field, "entrypoint");
    assert_eq!(invalid(with("entrypoint", json!([]))).field, "entrypoint");
    assert_eq!(
        invalid(with("entrypoint", json!(["", "x"]))).field,
        "entrypoint"
    );
    assert_eq!(
        invalid(with("entrypoint", json!(["sh", "a\u{0}b"]))).field,
        "entrypoint[1]"
    );
}

#[test]
fn metadata_rules() {
    let e = invalid(with("metadata", json!({"bad key": "v"})));
    assert_eq!(e.field, "metadata.bad key");
    assert_eq!(e.error_code(), ErrorCode::InvalidMetadataLabel);
    assert_eq!(
        invalid(with("metadata", json!({"opensandbox.io/x": "v"}))).field,
        "metadata.opensandbox.io/x"
    );
    assert_eq!(
        invalid(with("metadata", json!({"k": "-v"}))).field,
        "metadata.k"
    );
    assert_eq!(
        invalid(with("metadata", json!({"k": "v".repeat(64)}))).field,
        "metadata.k"
    );

    assert_eq!(
        validate_metadata_labels(&map(&[("name", ""), ("a.b/c", "D_1")])),
        Ok(())
    );
    let e = validate_metadata_labels(&map(&[("ok", "v"), ("", "v")])).unwrap_err();
    assert_eq!(e.field, "metadata.");
}

#[test]
fn env_rules() {
    assert_eq!(invalid(with("env", json!({"": "v"}))).field, "env");
    assert_eq!(invalid(with("env", json!({"A=B": "v"}))).field, "env.A=B");
    assert_eq!(
        invalid(with("env", json!({"A\u{0}": "v"}))).field,
        "env.A\u{0}"
    );
    assert_eq!(invalid(with("env", json!({"A": "x\u{0}"}))).field, "env.A");
    assert!(parse(&with("env", json!({"PATH": "/bin", "EMPTY": ""})))
        .unwrap()
        .validate(MAX_TIMEOUT, HOST_ARCH)
        .is_ok());
}

#[test]
fn platform_rules() {
    let e = invalid(with("platform", json!({"os": "windows"})));
    assert_eq!(e.field, "platform.os");
    let e = invalid(with("platform", json!({"os": "linux", "arch": "arm64"})));
    assert_eq!(e.field, "platform.arch");
    let ok = parse(&with("platform", json!({"os": "linux", "arch": "arm64"}))).unwrap();
    assert!(ok.validate(MAX_TIMEOUT, "aarch64").is_ok());
    assert!(ok.validate(MAX_TIMEOUT, "arm64").is_ok());
    let ok = parse(&with("platform", json!({"arch": "amd64"}))).unwrap();
    assert!(ok.validate(MAX_TIMEOUT, "x86_64").is_ok());
}

#[test]
fn network_rules() {
    let e = invalid(with("credentialProxy", json!({"enabled": true})));
    assert_eq!(e.field, "credentialProxy");
    assert!(parse(&with("credentialProxy", json!({"enabled": false})))
        .unwrap()
        .validate(MAX_TIMEOUT, HOST_ARCH)
        .is_ok());
    // The shape only; the grammar (names, wildcards, addresses, ports) is the network layer's,
    // which names the same field (`execbox_net::policy`).
    for bad in ["", "a b.com", "tab\tx"] {
        let e = invalid(with(
            "networkPolicy",
            json!({"egress": [{"action": "allow", "target": "ok.com"}, {"action": "deny", "target": bad}]}),
        ));
        assert_eq!(e.field, "networkPolicy.egress[1].target", "{bad}");
    }
    for good in [
        "Example.COM",
        "*.example.com",
        "localhost",
        "10.0.0.1",
        "::1",
        "example.com.",
        "203.0.113.0/24",
        "pypi.org:443",
    ] {
        assert!(
            parse(&with(
                "networkPolicy",
                json!({"egress": [{"action": "allow", "target": good}]})
            ))
            .unwrap()
            .validate(MAX_TIMEOUT, HOST_ARCH)
            .is_ok(),
            "{good}"
        );
    }
}

#[test]
fn volume_rules() {
    let vol = |v: Value| invalid(with("volumes", json!([v]))).field;
    assert_eq!(
        vol(json!({"name": "Data", "mountPath": "/d", "host": {"path": "/x"}})),
        "volumes[0].name"
    );
    assert_eq!(
        vol(json!({"name": "a".repeat(64), "mountPath": "/d", "host": {"path": "/x"}})),
        "volumes[0].name"
    );
    assert_eq!(
        vol(json!({"name": "d", "mountPath": "d", "host": {"path": "/x"}})),
        "volumes[0].mountPath"
    );
    assert_eq!(vol(json!({"name": "d", "mountPath": "/d"})), "volumes[0]");
    assert_eq!(
        vol(
            json!({"name": "d", "mountPath": "/d", "host": {"path": "/x"}, "pvc": {"claimName": "c"}})
        ),
        "volumes[0]"
    );
    assert_eq!(
        vol(json!({"name": "d", "mountPath": "/d", "host": {"path": "x"}})),
        "volumes[0].host.path"
    );
    assert_eq!(
        vol(json!({"name": "d", "mountPath": "/d", "subPath": "../etc", "host": {"path": "/x"}})),
        "volumes[0].subPath"
    );
    assert_eq!(
        vol(json!({"name": "d", "mountPath": "/d", "subPath": "/abs", "host": {"path": "/x"}})),
        "volumes[0].subPath"
    );
    assert_eq!(
        vol(json!({"name": "d", "mountPath": "/d", "pvc": {"claimName": "Bad_Claim"}})),
        "volumes[0].pvc.claimName"
    );
    assert_eq!(
        vol(
            json!({"name": "d", "mountPath": "/d", "ossfs": {"bucket": "", "endpoint": "e", "accessKeyId": "i", "accessKeySecret": "s"}})
        ),
        "volumes[0].ossfs.bucket"
    );
    let e = invalid(with(
        "volumes",
        json!([
            {"name": "a", "mountPath": "/a", "host": {"path": "/x"}},
            {"name": "a", "mountPath": "/b", "host": {"path": "/y"}}
        ]),
    ));
    assert_eq!(e.field, "volumes[1].name");
    let e = invalid(with(
        "volumes",
        json!([
            {"name": "a", "mountPath": "/a", "host": {"path": "/x"}},
            {"name": "b", "mountPath": "/a/", "host": {"path": "/y"}}
        ]),
    ));
    assert_eq!(e.field, "volumes[1].mountPath");
}

#[test]
fn extension_rules() {
    for bad in ["299", "86401", "abc", ""] {
        let e = invalid(with(
            "extensions",
            json!({"access.renew.extend.seconds": bad}),
        ));
        assert_eq!(e.field, "extensions.access.renew.extend.seconds", "{bad}");
    }
    let v = parse(&with(
        "extensions",
        json!({"access.renew.extend.seconds": "86400", "other": "x"}),
    ))
    .unwrap()
    .validate(MAX_TIMEOUT, HOST_ARCH)
    .unwrap();
    assert_eq!(v.renew_extend_secs, Some(86_400));
}

// ---- metadata filter and patch ----------------------------------------------------------------

#[test]
fn metadata_filter() {
    assert_eq!(
        parse_metadata_filter("project=Apollo&team=ml").unwrap(),
        vec![
            ("project".into(), "Apollo".into()),
            ("team".into(), "ml".into())
        ]
    );
    assert_eq!(
        parse_metadata_filter("a%2Fb=c%3Dd&e=").unwrap(),
        vec![("a/b".into(), "c=d".into()), ("e".into(), String::new())]
    );
    assert_eq!(parse_metadata_filter("").unwrap(), vec![]);
    assert_eq!(parse_metadata_filter("a=1&").unwrap().len(), 1);
    let e = parse_metadata_filter("a=1&broken").unwrap_err();
    assert_eq!(e.error_code(), ErrorCode::InvalidMetadataFormat);
    assert_eq!(e.to_envelope().code, "INVALID_METADATA_FORMAT");
    assert!(parse_metadata_filter("=v").is_err());
    assert!(parse_metadata_filter("a=%zz").is_err());
    assert!(parse_metadata_filter("a=%ff").is_err());
}

#[test]
fn list_query() {
    let q = ListSandboxesQuery::parse(
        "state=Running&state=Paused&metadata=project%3DApollo%26team%3Dml&page=2&pageSize=500&x=1",
    )
    .unwrap();
    assert_eq!(q.states, [SandboxState::Running, SandboxState::Paused]);
    assert_eq!(
        q.metadata,
        vec![
            ("project".into(), "Apollo".into()),
            ("team".into(), "ml".into())
        ]
    );
    assert_eq!((q.page, q.page_size), (2, MAX_PAGE_SIZE));
    assert_eq!(
        ListSandboxesQuery::parse("").unwrap(),
        ListSandboxesQuery::default()
    );

    let md = map(&[("project", "Apollo"), ("team", "ml"), ("x", "y")]);
    assert!(q.matches(SandboxState::Paused, Some(&md)));
    assert!(!q.matches(SandboxState::Pending, Some(&md)));
    assert!(!q.matches(SandboxState::Running, None));
    assert!(ListSandboxesQuery::default().matches(SandboxState::Failed, None));

    let e = ListSandboxesQuery::parse("metadata=a%3D1%26broken").unwrap_err();
    assert_eq!(e.error_code(), ErrorCode::InvalidMetadataFormat);
    // Any state is accepted; one no sandbox can have matches nothing.
    let q = ListSandboxesQuery::parse("state=Allocated").unwrap();
    assert!(!q.matches(SandboxState::Running, None));
    let q = ListSandboxesQuery::parse("state=Allocated&state=Running").unwrap();
    assert!(q.matches(SandboxState::Running, None));
    assert!(ListSandboxesQuery::parse("page=0").is_err());
    assert!(ListSandboxesQuery::parse("pageSize=abc").is_err());
}

#[test]
fn merge_patch() {
    let mut md = map(&[("a", "1"), ("b", "2")]);
    let patch = parse_metadata_patch(br#"{"a":"10","b":null,"c":"3","zz":null}"#).unwrap();
    apply_metadata_merge_patch(&mut md, &patch).unwrap();
    assert_eq!(md, map(&[("a", "10"), ("c", "3")]));

    apply_metadata_merge_patch(&mut md, &serde_json::Map::new()).unwrap();
    assert_eq!(md, map(&[("a", "10"), ("c", "3")]));

    let patch = parse_metadata_patch(br#"{"d":"4","n":5}"#).unwrap();
    let e = apply_metadata_merge_patch(&mut md, &patch).unwrap_err();
    assert_eq!(e.field, "metadata.n");
    assert_eq!(e.error_code(), ErrorCode::InvalidMetadataLabel);
    assert_eq!(md, map(&[("a", "10"), ("c", "3")]), "unchanged on error");

    let patch = parse_metadata_patch(br#"{"opensandbox.io/owner":"x"}"#).unwrap();
    assert_eq!(
        apply_metadata_merge_patch(&mut md, &patch)
            .unwrap_err()
            .field,
        "metadata.opensandbox.io/owner"
    );
    let patch = parse_metadata_patch(br#"{"k":"bad value"}"#).unwrap();
    assert!(apply_metadata_merge_patch(&mut md, &patch).is_err());

    assert_eq!(parse_metadata_patch(b"[]").unwrap_err().field, "metadata");
    assert_eq!(parse_metadata_patch(b"{").unwrap_err().field, "metadata");
}
