//! JSON body parsing that names the offending field in errors.
//!
//! Bodies are first read as `serde_json::Value`; each known field is then type-checked by hand so
//! the error can carry a JSON path (`timeout: invalid type: string, expected an integer`), and
//! finally the typed struct is built by serde.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::types::{CreateSandboxRequest, RenewExpirationRequest};
use super::validate::ValidationError;

/// JSON type name of `v` (`null`, `boolean`, `number`, `string`, `array`, `object`).
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Result of a check.
type Check = Result<(), ValidationError>;

/// A type checker for the value at a JSON path.
type Checker = fn(&Value, &str) -> Check;

/// `path.key`, or `key` at the top level.
fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A type mismatch at `path`.
fn type_error(path: &str, v: &Value, expected: &str) -> ValidationError {
    ValidationError::new(
        path,
        format!("invalid type: {}, expected {expected}", json_kind(v)),
    )
}

/// Parses `body` as JSON; the error says where the syntax is broken.
fn parse_value(body: &[u8]) -> Result<Value, ValidationError> {
    serde_json::from_slice(body)
        .map_err(|e| ValidationError::new("", format!("malformed JSON: {e}")))
}

/// The body as an object.
fn body_object(v: &Value) -> Result<&Map<String, Value>, ValidationError> {
    v.as_object().ok_or_else(|| {
        ValidationError::new(
            "",
            format!("request body must be a JSON object, not {}", json_kind(v)),
        )
    })
}

/// `obj[key]`, with `null` read as absent.
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// `obj[key]` that must be present and non-null.
fn required<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a Value, ValidationError> {
    get(obj, key).ok_or_else(|| ValidationError::new(join(path, key), "missing required field"))
}

fn check_string(v: &Value, path: &str) -> Check {
    if v.is_string() {
        Ok(())
    } else {
        Err(type_error(path, v, "a string"))
    }
}

fn check_bool(v: &Value, path: &str) -> Check {
    if v.is_boolean() {
        Ok(())
    } else {
        Err(type_error(path, v, "a boolean"))
    }
}

fn check_i64(v: &Value, path: &str) -> Check {
    match v {
        Value::Number(n) if n.is_i64() => Ok(()),
        Value::Number(n) => Err(ValidationError::new(
            path,
            format!("invalid value: {n}, expected an integer"),
        )),
        other => Err(type_error(path, other, "an integer")),
    }
}

fn check_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ValidationError> {
    v.as_object()
        .ok_or_else(|| type_error(path, v, "an object"))
}

fn check_array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>, ValidationError> {
    v.as_array().ok_or_else(|| type_error(path, v, "an array"))
}

/// An object whose values are all strings.
fn check_string_map(v: &Value, path: &str) -> Check {
    check_object(v, path)?
        .iter()
        .try_for_each(|(k, item)| check_string(item, &join(path, k)))
}

/// An array of strings.
fn check_string_array(v: &Value, path: &str) -> Check {
    check_array(v, path)?
        .iter()
        .enumerate()
        .try_for_each(|(i, item)| check_string(item, &format!("{path}[{i}]")))
}

/// Optional fields of `obj` with their checkers.
fn check_optional(obj: &Map<String, Value>, path: &str, fields: &[(&str, Checker)]) -> Check {
    fields
        .iter()
        .try_for_each(|(key, check)| match get(obj, key) {
            Some(v) => check(v, &join(path, key)),
            None => Ok(()),
        })
}

/// Required string fields of `obj`.
fn check_required_strings(obj: &Map<String, Value>, path: &str, keys: &[&str]) -> Check {
    keys.iter()
        .try_for_each(|key| check_string(required(obj, key, path)?, &join(path, key)))
}

fn check_image(v: &Value, path: &str) -> Check {
    let obj = check_object(v, path)?;
    check_required_strings(obj, path, &["uri"])?;
    if let Some(auth) = get(obj, "auth") {
        let auth_path = join(path, "auth");
        let a = check_object(auth, &auth_path)?;
        check_optional(
            a,
            &auth_path,
            &[("username", check_string), ("password", check_string)],
        )?;
    }
    Ok(())
}

fn check_platform(v: &Value, path: &str) -> Check {
    let obj = check_object(v, path)?;
    check_optional(obj, path, &[("os", check_string), ("arch", check_string)])
}

fn check_action(v: &Value, path: &str) -> Check {
    match v.as_str() {
        Some("allow" | "deny") => Ok(()),
        Some(other) => Err(ValidationError::new(
            path,
            format!("invalid value: {other:?}, expected \"allow\" or \"deny\""),
        )),
        None => Err(type_error(path, v, "\"allow\" or \"deny\"")),
    }
}

fn check_network_policy(v: &Value, path: &str) -> Check {
    let obj = check_object(v, path)?;
    check_optional(obj, path, &[("defaultAction", check_action)])?;
    if let Some(egress) = get(obj, "egress") {
        let egress_path = join(path, "egress");
        for (i, rule) in check_array(egress, &egress_path)?.iter().enumerate() {
            let rule_path = format!("{egress_path}[{i}]");
            let r = check_object(rule, &rule_path)?;
            check_action(
                required(r, "action", &rule_path)?,
                &join(&rule_path, "action"),
            )?;
            check_required_strings(r, &rule_path, &["target"])?;
        }
    }
    Ok(())
}

fn check_credential_proxy(v: &Value, path: &str) -> Check {
    let obj = check_object(v, path)?;
    check_optional(obj, path, &[("enabled", check_bool)])
}

fn check_volume(v: &Value, path: &str) -> Check {
    let obj = check_object(v, path)?;
    check_required_strings(obj, path, &["name", "mountPath"])?;
    check_optional(
        obj,
        path,
        &[("readOnly", check_bool), ("subPath", check_string)],
    )?;
    if let Some(host) = get(obj, "host") {
        let p = join(path, "host");
        check_required_strings(check_object(host, &p)?, &p, &["path"])?;
    }
    if let Some(pvc) = get(obj, "pvc") {
        let p = join(path, "pvc");
        let o = check_object(pvc, &p)?;
        check_required_strings(o, &p, &["claimName"])?;
        check_optional(
            o,
            &p,
            &[
                ("createIfNotExists", check_bool),
                ("deleteOnSandboxTermination", check_bool),
                ("storageClass", check_string),
                ("storage", check_string),
                ("accessModes", check_string_array),
            ],
        )?;
    }
    if let Some(ossfs) = get(obj, "ossfs") {
        let p = join(path, "ossfs");
        let o = check_object(ossfs, &p)?;
        check_required_strings(
            o,
            &p,
            &["bucket", "endpoint", "accessKeyId", "accessKeySecret"],
        )?;
        check_optional(
            o,
            &p,
            &[("version", check_string), ("options", check_string_array)],
        )?;
    }
    Ok(())
}

fn check_volumes(v: &Value, path: &str) -> Check {
    check_array(v, path)?
        .iter()
        .enumerate()
        .try_for_each(|(i, item)| check_volume(item, &format!("{path}[{i}]")))
}

/// Builds `T` from an already type-checked value; a residual serde error is reported on `path`.
fn build<T: DeserializeOwned>(v: Value, path: &str) -> Result<T, ValidationError> {
    serde_json::from_value(v).map_err(|e| ValidationError::new(path, e.to_string()))
}

/// Parses the body of `POST /v1/sandboxes`. Type errors name the field by JSON path
/// (`timeout: invalid type: string, expected an integer`, `volumes[0].mountPath: missing required
/// field`); malformed JSON has an empty field and a `malformed JSON: …` message. Unknown fields are
/// ignored and `null` is read as absent. Semantic rules are checked separately by
/// [`CreateSandboxRequest::validate`].
pub fn parse_create_request(body: &[u8]) -> Result<CreateSandboxRequest, ValidationError> {
    let value = parse_value(body)?;
    let obj = body_object(&value)?;
    check_optional(
        obj,
        "",
        &[
            ("image", check_image),
            ("snapshotId", check_string),
            ("entrypoint", check_string_array),
            ("timeout", check_i64),
            ("resourceLimits", check_string_map),
            ("env", check_string_map),
            ("metadata", check_string_map),
            ("platform", check_platform),
            ("networkPolicy", check_network_policy),
            ("credentialProxy", check_credential_proxy),
            ("secureAccess", check_bool),
            ("volumes", check_volumes),
            ("extensions", check_string_map),
        ],
    )?;
    build(value, "")
}

/// Parses the body of `POST …/renew-expiration` (`{"expiresAt":"<RFC 3339>"}`); errors name
/// `expiresAt`.
pub fn parse_renew_request(body: &[u8]) -> Result<RenewExpirationRequest, ValidationError> {
    let value = parse_value(body)?;
    let obj = body_object(&value)?;
    let ts = required(obj, "expiresAt", "")?;
    check_string(ts, "expiresAt")?;
    build(value, "expiresAt")
}

/// Parses the body of `PATCH …/metadata`: a JSON object (the merge patch itself), to be applied
/// with [`super::apply_metadata_merge_patch`]. Errors name the field `metadata`.
pub fn parse_metadata_patch(body: &[u8]) -> Result<Map<String, Value>, ValidationError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(type_error("metadata", &other, "a JSON object")),
        Err(e) => Err(ValidationError::new(
            "metadata",
            format!("malformed JSON: {e}"),
        )),
    }
}
