//! Namespaced `coordination.k8s.io/v1` Leases in the test API server, answered as
//! kube-apiserver's generic registry answers them (`registry/generic/registry/store.go` with the
//! Lease strategy: create-on-update allowed, unconditional update not allowed):
//! - `GET …/namespaces/{ns}/leases/{name}`: the object, or `404 NotFound`.
//! - `POST …/namespaces/{ns}/leases`: `201 Created` with a new `resourceVersion`, `uid` and
//!   `creationTimestamp`, or `409 AlreadyExists` if the name is taken.
//! - `PUT …/namespaces/{ns}/leases/{name}`: optimistic concurrency — the body's
//!   `metadata.resourceVersion` must be the stored one (`409 Conflict` otherwise, `422 Invalid`
//!   when it is missing); an absent Lease is created (`201`, and the authorizer also checks
//!   `create`, so that call is recorded too).
//! - Validation as `ValidateLeaseSpec`: `leaseDurationSeconds` > 0 and `leaseTransitions` ≥ 0
//!   when set (`422 Invalid`); the body's name and namespace must match the URL (`400`).
//!
//! Nothing else is served for Leases (list, watch, patch, delete answer `405`): the election code
//! calls only these, and a call outside them shows up in [`super::ApiServer::calls`] anyway.
use axum::{
    body::Bytes,
    http::{Method, StatusCode},
    response::Response,
};
use serde_json::{Value, json};

use super::apiserver::{ApiCall, Inner, json_response, status};

/// The API group of Leases.
pub const GROUP: &str = "coordination.k8s.io";
const API_VERSION: &str = "coordination.k8s.io/v1";
/// How kube-apiserver names the resource in its messages (`leases.coordination.k8s.io "x"`).
const QUALIFIED: &str = "leases.coordination.k8s.io";

/// An error answer: a `Status` with the code, reason and message kube-apiserver gives.
struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
    /// The object named in `details`.
    name: Option<String>,
}

impl Failure {
    fn new(code: StatusCode, reason: &'static str, message: String, name: Option<&str>) -> Self {
        Self {
            code,
            reason,
            message,
            name: name.map(String::from),
        }
    }

    fn response(self) -> Response {
        let mut body = status(self.code.as_u16(), self.reason, &self.message);
        if let Some(name) = self.name {
            body["details"] = json!({"name": name, "group": GROUP, "kind": "leases"});
        }
        json_response(self.code, &body)
    }
}

fn not_found(name: &str) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{QUALIFIED} \"{name}\" not found"),
        Some(name),
    )
}

fn invalid(name: &str, field: &str, value: &Value, why: &str) -> Failure {
    Failure::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        format!("Lease.{GROUP} \"{name}\" is invalid: {field}: Invalid value: {value}: {why}"),
        Some(name),
    )
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, "BadRequest", message.into(), None)
}

/// `ValidateLeaseSpec`'s checks of the fields election code writes.
fn validate(name: &str, lease: &Value) -> Result<(), Failure> {
    let spec = &lease["spec"];
    if let Some(d) = spec.get("leaseDurationSeconds").filter(|v| !v.is_null())
        && d.as_i64().is_none_or(|d| d <= 0)
    {
        return Err(invalid(
            name,
            "spec.leaseDurationSeconds",
            d,
            "must be greater than 0",
        ));
    }
    if let Some(t) = spec.get("leaseTransitions").filter(|v| !v.is_null())
        && t.as_i64().is_none_or(|t| t < 0)
    {
        return Err(invalid(
            name,
            "spec.leaseTransitions",
            t,
            "must be greater than or equal to 0",
        ));
    }
    Ok(())
}

/// The request body as a Lease of `namespace` (named `url_name` if the URL names one).
fn parse(body: &Bytes, namespace: &str, url_name: Option<&str>) -> Result<Value, Failure> {
    let lease: Value = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body of the request is not a Lease: {e}")))?;
    if !lease.is_object() {
        return Err(bad_request("the body of the request is not an object"));
    }
    let name = lease["metadata"]["name"].as_str().unwrap_or("");
    if name.is_empty() {
        return Err(Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "Lease.{GROUP} \"\" is invalid: metadata.name: Required value: name or \
                 generateName is required"
            ),
            None,
        ));
    }
    if let Some(url_name) = url_name
        && name != url_name
    {
        return Err(bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({url_name})"
        )));
    }
    if let Some(ns) = lease["metadata"]["namespace"].as_str()
        && !ns.is_empty()
        && ns != namespace
    {
        return Err(bad_request(
            "the namespace of the provided object does not match the namespace sent on the \
             request",
        ));
    }
    validate(name, &lease)?;
    Ok(lease)
}

/// Stores `lease` as `namespace/name` at a new resource version. The fields the server owns
/// (`uid`, `creationTimestamp`) are kept from `previous`, or made for a new object.
fn store(inner: &mut Inner, namespace: &str, mut lease: Value, previous: Option<&Value>) -> Value {
    inner.rv += 1;
    let rv = inner.rv;
    let name = lease["metadata"]["name"].as_str().unwrap().to_string();
    lease["apiVersion"] = json!(API_VERSION);
    lease["kind"] = json!("Lease");
    let meta = &mut lease["metadata"];
    meta["namespace"] = json!(namespace);
    meta["resourceVersion"] = json!(rv.to_string());
    match previous {
        Some(old) => {
            meta["uid"] = old["metadata"]["uid"].clone();
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
        }
        None => {
            meta["uid"] = json!(format!("lease-{namespace}-{name}-{rv}"));
            meta["creationTimestamp"] =
                json!(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
        }
    }
    inner
        .leases
        .insert((namespace.to_string(), name), lease.clone());
    lease
}

/// Answers one Lease request (already recorded as `call`).
pub(super) fn handle(inner: &mut Inner, method: &Method, call: &ApiCall, body: &Bytes) -> Response {
    match answer(inner, method, call, body) {
        Ok((code, lease)) => json_response(code, &lease),
        Err(failure) => failure.response(),
    }
}

fn answer(
    inner: &mut Inner,
    method: &Method,
    call: &ApiCall,
    body: &Bytes,
) -> Result<(StatusCode, Value), Failure> {
    let not_served = |what: &str| {
        Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{what} is not served by this test server"),
            None,
        )
    };
    let Some(namespace) = call.namespace.as_deref() else {
        return Err(not_served("a Lease outside a namespace"));
    };
    let key = |name: &str| (namespace.to_string(), name.to_string());
    match (method.as_str(), call.verb.as_str(), call.name.as_deref()) {
        ("GET", "get", Some(name)) => match inner.leases.get(&key(name)) {
            Some(lease) => Ok((StatusCode::OK, lease.clone())),
            None => Err(not_found(name)),
        },
        ("POST", "create", None) => {
            let lease = parse(body, namespace, None)?;
            let name = lease["metadata"]["name"].as_str().unwrap().to_string();
            if inner.leases.contains_key(&key(&name)) {
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{QUALIFIED} \"{name}\" already exists"),
                    Some(&name),
                ));
            }
            Ok((StatusCode::CREATED, store(inner, namespace, lease, None)))
        }
        ("PUT", "update", Some(name)) => {
            let lease = parse(body, namespace, Some(name))?;
            let Some(existing) = inner.leases.get(&key(name)).cloned() else {
                // Create-on-update: the handler also authorizes `create`.
                inner.calls.insert(ApiCall {
                    verb: "create".to_string(),
                    ..call.clone()
                });
                return Ok((StatusCode::CREATED, store(inner, namespace, lease, None)));
            };
            let wanted = lease["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if wanted.is_empty() {
                return Err(invalid(
                    name,
                    "metadata.resourceVersion",
                    &json!("0x0"),
                    "must be specified for an update",
                ));
            }
            if wanted
                != existing["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
            {
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {QUALIFIED} \"{name}\": the object has \
                         been modified; please apply your changes to the latest version and try \
                         again"
                    ),
                    Some(name),
                ));
            }
            Ok((
                StatusCode::OK,
                store(inner, namespace, lease, Some(&existing)),
            ))
        }
        (_, verb, _) => Err(not_served(&format!("{verb} of leases"))),
    }
}
