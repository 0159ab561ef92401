//! The security posture of rendered Kubernetes objects: what every flowlog pod, container and
//! RBAC rule must (not) do. [`check`] returns one line per violation, so a test asserts an empty
//! list and a failure says exactly what is wrong where.
//!
//! The rules: no privileged container and no host namespaces; every container drops ALL
//! capabilities and adds the agent's proven set (the agent) or nothing (the rest); requests and
//! limits for CPU and memory, a liveness (`/healthz`) and a readiness (`/readyz`) probe on every
//! container; read-only root file systems and no privilege escalation everywhere; non-root
//! everywhere but the agent; seccomp `RuntimeDefault`; hostPath volumes only in the agent and
//! only the ones it needs; images only from the kustomization's `images:`; each pod within the
//! Pod Security level its namespace enforces; RBAC verbs only get/list/watch, plus the Lease's.
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::kubernetes::{containers, describe, pod_spec, str_at};

/// What the posture allows, where it is not the same for every pod.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `app.kubernetes.io/name` of the agent's pods: the one workload that runs as root, adds
    /// capabilities and mounts host paths.
    pub agent: String,
    /// The capabilities the agent adds, exactly (Kubernetes names, without `CAP_`).
    pub agent_capabilities: BTreeSet<String>,
    /// The host paths the agent may mount, each with whether its mount must be read-only.
    pub agent_host_paths: BTreeMap<String, bool>,
    /// Every image reference a container may use.
    pub images: BTreeSet<String>,
}

impl Policy {
    /// flowlog's policy: the agent `flowlog-agent` with `capabilities` and the host paths of
    /// tracefs and BTF (read-only), its state directory and bpffs (read-write), and `images`.
    pub fn flowlog(capabilities: &[String], images: BTreeSet<String>) -> Self {
        Policy {
            agent: "flowlog-agent".to_string(),
            agent_capabilities: capabilities.iter().cloned().collect(),
            agent_host_paths: BTreeMap::from([
                ("/sys/kernel/tracing".to_string(), true),
                ("/sys/kernel/btf".to_string(), true),
                ("/var/lib/flowlog".to_string(), false),
                // bpffs: the agent pins its kernel state there (README "Restarts and upgrades").
                ("/sys/fs/bpf".to_string(), false),
            ]),
            images,
        }
    }
}

/// The verbs any RBAC rule may grant.
pub const READ_VERBS: [&str; 3] = ["get", "list", "watch"];
/// The verbs a rule on `coordination.k8s.io` leases may grant besides [`READ_VERBS`] (leader
/// election: create the Lease, then renew it).
pub const LEASE_VERBS: [&str; 2] = ["create", "update"];

/// Capabilities the Pod Security `baseline` level lets a container add.
const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
/// Volume types the Pod Security `restricted` level allows.
const RESTRICTED_VOLUMES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Pod Security Standards levels, most permissive first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Restricted,
    Baseline,
    Privileged,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        match s {
            "restricted" => Some(Level::Restricted),
            "baseline" => Some(Level::Baseline),
            "privileged" => Some(Level::Privileged),
            _ => None,
        }
    }
}

/// Every violation of the posture in `objects`, one line each; empty when all is well.
pub fn check(objects: &[Value], policy: &Policy) -> Vec<String> {
    let mut violations = Vec::new();
    let enforced: BTreeMap<&str, Option<Level>> = objects
        .iter()
        .filter(|o| str_at(o, "/kind") == "Namespace")
        .map(|ns| {
            let level = ns
                .pointer("/metadata/labels/pod-security.kubernetes.io~1enforce")
                .and_then(Value::as_str)
                .and_then(Level::parse);
            (str_at(ns, "/metadata/name"), level)
        })
        .collect();
    for object in objects {
        if let Some(pod) = pod_spec(object) {
            check_pod(object, pod, policy, &enforced, &mut violations);
        }
        match str_at(object, "/kind") {
            "ClusterRole" | "Role" => check_rules(object, &mut violations),
            _ => {}
        }
    }
    violations
}

/// The pod's `app.kubernetes.io/name` label (of its template).
fn pod_name_label(object: &Value) -> &str {
    let labels = match str_at(object, "/kind") {
        "Pod" => object.pointer("/metadata/labels"),
        "CronJob" => object.pointer("/spec/jobTemplate/spec/template/metadata/labels"),
        _ => object.pointer("/spec/template/metadata/labels"),
    };
    labels
        .and_then(|l| l.get("app.kubernetes.io/name"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// A security setting of a container, falling back to the pod's (`securityContext`).
fn effective<'a>(pod: &'a Value, container: &'a Value, key: &str) -> Option<&'a Value> {
    container
        .pointer(&format!("/securityContext/{key}"))
        .or_else(|| pod.pointer(&format!("/securityContext/{key}")))
}

fn strings(value: Option<&Value>) -> BTreeSet<String> {
    value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

fn check_pod(
    object: &Value,
    pod: &Value,
    policy: &Policy,
    enforced: &BTreeMap<&str, Option<Level>>,
    violations: &mut Vec<String>,
) {
    let what = describe(object);
    let is_agent = pod_name_label(object) == policy.agent;
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod.get(key).and_then(Value::as_bool) == Some(true) {
            violations.push(format!("{what}: {key} is true"));
        }
    }
    let volumes = pod.get("volumes").and_then(Value::as_array);
    let mut host_volumes = BTreeMap::new();
    for volume in volumes.into_iter().flatten() {
        if let Some(path) = volume.pointer("/hostPath/path").and_then(Value::as_str) {
            let name = str_at(volume, "/name");
            match policy.agent_host_paths.get(path) {
                Some(&read_only) if is_agent => {
                    host_volumes.insert(name.to_string(), (path.to_string(), read_only));
                }
                _ => violations.push(format!("{what}: hostPath volume {name} ({path})")),
            }
        }
    }
    for container in containers(pod) {
        let name = str_at(container, "/name");
        let at = format!("{what} container {name}");
        check_container(&at, pod, container, is_agent, policy, violations);
        let mounts = container.get("volumeMounts").and_then(Value::as_array);
        for mount in mounts.into_iter().flatten() {
            let volume = str_at(mount, "/name");
            if let Some((path, true)) = host_volumes.get(volume)
                && mount.get("readOnly").and_then(Value::as_bool) != Some(true)
            {
                violations.push(format!("{at}: hostPath {path} is not mounted read-only"));
            }
        }
    }
    let namespace = str_at(object, "/metadata/namespace");
    match enforced.get(namespace) {
        None => violations.push(format!(
            "{what}: namespace {namespace:?} is not in the manifests"
        )),
        Some(None) => violations.push(format!(
            "{what}: namespace {namespace} has no pod-security.kubernetes.io/enforce level"
        )),
        Some(Some(allowed)) => {
            let level = pod_security_level(pod);
            if level > *allowed {
                violations.push(format!(
                    "{what}: needs Pod Security level {level:?}, namespace {namespace} enforces {allowed:?}"
                ));
            }
        }
    }
}

fn check_container(
    at: &str,
    pod: &Value,
    container: &Value,
    is_agent: bool,
    policy: &Policy,
    violations: &mut Vec<String>,
) {
    let context = |key: &str| container.pointer(&format!("/securityContext/{key}"));
    if context("privileged").and_then(Value::as_bool) == Some(true) {
        violations.push(format!("{at}: privileged"));
    }
    if context("allowPrivilegeEscalation").and_then(Value::as_bool) != Some(false) {
        violations.push(format!("{at}: allowPrivilegeEscalation is not false"));
    }
    if context("readOnlyRootFilesystem").and_then(Value::as_bool) != Some(true) {
        violations.push(format!("{at}: readOnlyRootFilesystem is not true"));
    }
    let drop = strings(context("capabilities/drop"));
    if drop != BTreeSet::from(["ALL".to_string()]) {
        violations.push(format!(
            "{at}: capabilities.drop is {drop:?}, not [\"ALL\"]"
        ));
    }
    let add = strings(context("capabilities/add"));
    let allowed = if is_agent {
        policy.agent_capabilities.clone()
    } else {
        BTreeSet::new()
    };
    if add != allowed {
        violations.push(format!(
            "{at}: capabilities.add is {add:?}, not {allowed:?}"
        ));
    }
    if !is_agent {
        if effective(pod, container, "runAsNonRoot").and_then(Value::as_bool) != Some(true) {
            violations.push(format!("{at}: runAsNonRoot is not true"));
        }
        if effective(pod, container, "runAsUser").and_then(Value::as_u64) == Some(0) {
            violations.push(format!("{at}: runAsUser is 0"));
        }
    }
    let seccomp = effective(pod, container, "seccompProfile/type").and_then(Value::as_str);
    if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
        violations.push(format!(
            "{at}: seccompProfile is {seccomp:?}, not RuntimeDefault"
        ));
    }
    let image = str_at(container, "/image");
    if !policy.images.contains(image) {
        violations.push(format!(
            "{at}: image {image:?} is not one of the kustomization's images {:?}",
            policy.images
        ));
    }
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            if container
                .pointer(&format!("/resources/{kind}/{resource}"))
                .is_none()
            {
                violations.push(format!("{at}: no resources.{kind}.{resource}"));
            }
        }
    }
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let got = container
            .pointer(&format!("/{probe}/httpGet/path"))
            .and_then(Value::as_str);
        if got != Some(path) {
            violations.push(format!(
                "{at}: {probe} is not an HTTP GET of {path} (found {got:?})"
            ));
        }
    }
}

/// The least permissive Pod Security Standards level a pod meets (the checks that concern
/// flowlog's manifests: host namespaces, privileged, capabilities, host paths and ports,
/// volume types, privilege escalation, non-root, seccomp).
pub fn pod_security_level(pod: &Value) -> Level {
    let host_namespace = ["hostNetwork", "hostPID", "hostIPC"]
        .iter()
        .any(|k| pod.get(*k).and_then(Value::as_bool) == Some(true));
    let volumes: Vec<&Value> = pod
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    let host_path = volumes.iter().any(|v| v.get("hostPath").is_some());
    let mut baseline = !host_namespace && !host_path;
    let mut restricted = baseline
        && volumes.iter().all(|v| {
            v.as_object().is_some_and(|o| {
                o.keys()
                    .filter(|k| k.as_str() != "name")
                    .all(|k| RESTRICTED_VOLUMES.contains(&k.as_str()))
            })
        });
    for container in containers(pod) {
        let context = |key: &str| container.pointer(&format!("/securityContext/{key}"));
        let add = strings(context("capabilities/add"));
        let drop = strings(context("capabilities/drop"));
        let host_port = container
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|p| p.get("hostPort").and_then(Value::as_u64).unwrap_or(0) != 0);
        let seccomp = effective(pod, container, "seccompProfile/type").and_then(Value::as_str);
        if context("privileged").and_then(Value::as_bool) == Some(true)
            || host_port
            || seccomp == Some("Unconfined")
            || !add
                .iter()
                .all(|c| BASELINE_CAPABILITIES.contains(&c.as_str()))
        {
            baseline = false;
        }
        if context("allowPrivilegeEscalation").and_then(Value::as_bool) != Some(false)
            || effective(pod, container, "runAsNonRoot").and_then(Value::as_bool) != Some(true)
            || effective(pod, container, "runAsUser").and_then(Value::as_u64) == Some(0)
            || !matches!(seccomp, Some("RuntimeDefault" | "Localhost"))
            || !drop.contains("ALL")
            || !add.iter().all(|c| c == "NET_BIND_SERVICE")
        {
            restricted = false;
        }
    }
    if baseline && restricted {
        Level::Restricted
    } else if baseline {
        Level::Baseline
    } else {
        Level::Privileged
    }
}

/// RBAC: verbs only get/list/watch, plus create/update on leases; no wildcards.
fn check_rules(object: &Value, violations: &mut Vec<String>) {
    let what = describe(object);
    let rules = object.get("rules").and_then(Value::as_array);
    for (i, rule) in rules.into_iter().flatten().enumerate() {
        let groups = strings(rule.get("apiGroups"));
        let resources = strings(rule.get("resources"));
        let verbs = strings(rule.get("verbs"));
        for (field, values) in [
            ("apiGroups", &groups),
            ("resources", &resources),
            ("verbs", &verbs),
        ] {
            if values.contains("*") {
                violations.push(format!("{what} rule {i}: {field} has a wildcard"));
            }
        }
        if rule.get("nonResourceURLs").is_some() {
            violations.push(format!("{what} rule {i}: nonResourceURLs"));
        }
        let lease_rule = str_at(object, "/kind") == "Role"
            && groups == BTreeSet::from(["coordination.k8s.io".to_string()])
            && resources == BTreeSet::from(["leases".to_string()]);
        let allowed =
            |verb: &str| READ_VERBS.contains(&verb) || (lease_rule && LEASE_VERBS.contains(&verb));
        let extra: BTreeSet<&String> = verbs.iter().filter(|v| !allowed(v)).collect();
        if !extra.is_empty() {
            violations.push(format!(
                "{what} rule {i}: verbs {extra:?} beyond get/list/watch"
            ));
        }
    }
}
