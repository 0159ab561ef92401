//! The Kubernetes manifests as the tests see them: every overlay rendered by `kubectl
//! kustomize`, parsed into JSON values, validated against the API schemas of several
//! Kubernetes versions by PyPI `kubernetes-validate`, and the image references each overlay's
//! `images:` lists promise (computed from the kustomization files, not by kustomize).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::deploy_dir;

/// The Kubernetes versions every object must validate against.
pub const KUBERNETES_VERSIONS: [&str; 4] = ["1.30.0", "1.31.0", "1.32.0", "1.33.0"];

/// API groups of custom resources (CRDs): `kubernetes-validate` has no schema for them, so they
/// are checked for shape here instead (they still must parse and name what they act on).
pub const CRD_GROUPS: [&str; 2] = ["keda.sh", "monitoring.coreos.com"];

/// `deploy/kubernetes/`.
pub fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// Every overlay directory (`deploy/kubernetes/overlays/*`), sorted by name.
pub fn overlays() -> anyhow::Result<Vec<PathBuf>> {
    let dir = kubernetes_dir().join("overlays");
    let mut overlays = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.join("kustomization.yaml").is_file() {
            overlays.push(path);
        }
    }
    overlays.sort();
    Ok(overlays)
}

/// Renders a kustomization directory with `kubectl kustomize` (kustomize built into kubectl).
pub fn kustomize(dir: &Path) -> anyhow::Result<String> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "running `kubectl kustomize {}`: {e}. kubectl is required to render the \
                 Kubernetes manifests (its built-in kustomize): install it (it is on this \
                 project's machine image) and run the tests again",
                dir.display()
            )
        })?;
    ensure!(
        output.status.success(),
        "`kubectl kustomize {}` failed ({}): {}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).context("kubectl kustomize printed something not UTF-8")
}

/// The objects of a multi-document YAML stream, in order (empty documents skipped).
pub fn parse_objects(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let objects: Vec<Value> =
        serde_saphyr::from_multiple(yaml).context("parsing a multi-document YAML stream")?;
    for (i, object) in objects.iter().enumerate() {
        ensure!(
            object.get("apiVersion").and_then(Value::as_str).is_some()
                && object.get("kind").and_then(Value::as_str).is_some()
                && object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .is_some(),
            "document {i} has no apiVersion, kind or metadata.name: {object}"
        );
    }
    Ok(objects)
}

/// Parses one YAML file (a single document).
pub fn read_yaml(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `kind/name` of an object, as `kubernetes-validate` names it in its report (kind lower-cased).
pub fn object_id(object: &Value) -> String {
    format!(
        "{}/{}",
        str_at(object, "/kind").to_lowercase(),
        str_at(object, "/metadata/name")
    )
}

/// `Kind namespace/name` (or `Kind name` for cluster-scoped objects), for messages.
pub fn describe(object: &Value) -> String {
    match object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        Some(ns) => format!(
            "{} {ns}/{}",
            str_at(object, "/kind"),
            str_at(object, "/metadata/name")
        ),
        None => format!(
            "{} {}",
            str_at(object, "/kind"),
            str_at(object, "/metadata/name")
        ),
    }
}

/// The string at a JSON pointer, or "" if absent.
pub fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Whether an object is a custom resource (its API group is one of [`CRD_GROUPS`]).
pub fn is_custom_resource(object: &Value) -> bool {
    let api_version = str_at(object, "/apiVersion");
    CRD_GROUPS
        .iter()
        .any(|group| api_version.starts_with(&format!("{group}/")))
}

/// What `kubernetes-validate` said about a stream of objects for one Kubernetes version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// Whether it exited 0.
    pub success: bool,
    /// `kind/name` of every object it reported as passed, sorted (one entry per object: two
    /// objects of one kind and name in two namespaces appear twice).
    pub passed: Vec<String>,
    /// Its whole output (errors and warnings), for failure messages.
    pub output: String,
}

/// Runs `kubernetes-validate --strict -k VERSION -` over `objects` (rendered back to JSON
/// documents, which are YAML).
pub fn validate(objects: &[Value], version: &str) -> anyhow::Result<Validation> {
    let mut child = Command::new("kubernetes-validate")
        .args(["--strict", "-k", version, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "running kubernetes-validate: {e}. It is the PyPI package kubernetes-validate, \
                 installed by scripts/bootstrap"
            )
        })?;
    let mut stream = String::new();
    for object in objects {
        stream.push_str("---\n");
        stream.push_str(&serde_json::to_string(object)?);
        stream.push('\n');
    }
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stream.as_bytes())
        .context("writing objects to kubernetes-validate")?;
    let output = child
        .wait_with_output()
        .context("waiting for kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut passed: Vec<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("INFO - passed for resource "))
        .filter_map(|rest| rest.split(" against version ").next())
        .map(str::to_string)
        .collect();
    passed.sort();
    Ok(Validation {
        success: output.status.success(),
        passed,
        output: text,
    })
}

/// One entry of a kustomization's `images:`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageRule {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

/// The `images:` rules of a kustomization and of every kustomization it builds on (its
/// `resources:` that are directories), innermost (base) first, as kustomize applies them.
fn image_rules(dir: &Path) -> anyhow::Result<Vec<ImageRule>> {
    let kustomization = read_yaml(&dir.join("kustomization.yaml"))?;
    let mut rules = Vec::new();
    let resources = kustomization.get("resources").and_then(Value::as_array);
    for resource in resources.into_iter().flatten() {
        let path = dir.join(resource.as_str().unwrap_or_default());
        if path.join("kustomization.yaml").is_file() {
            rules.extend(image_rules(&path)?);
        }
    }
    let images = kustomization.get("images").and_then(Value::as_array);
    for image in images.into_iter().flatten() {
        let field = |key: &str| image.get(key).and_then(Value::as_str).map(str::to_string);
        rules.push(ImageRule {
            name: field("name")
                .with_context(|| format!("an image without a name in {}", dir.display()))?,
            new_name: field("newName"),
            new_tag: field("newTag"),
        });
    }
    Ok(rules)
}

/// The image references an overlay promises: each image named in the base's `images:` list,
/// after every `images:` rule of the chain from the base to the overlay. Every container of the
/// rendered overlay must use one of these.
pub fn expected_images(overlay: &Path) -> anyhow::Result<BTreeSet<String>> {
    let rules = image_rules(overlay)?;
    let base_names: BTreeSet<String> = image_rules(&kubernetes_dir().join("base"))?
        .into_iter()
        .map(|r| r.name)
        .collect();
    if base_names.is_empty() {
        bail!("deploy/kubernetes/base/kustomization.yaml lists no images");
    }
    let mut images = BTreeMap::new();
    for original in &base_names {
        let (mut name, mut tag) = (original.clone(), None::<String>);
        for rule in &rules {
            if rule.name == name {
                if let Some(new_name) = &rule.new_name {
                    name = new_name.clone();
                }
                if let Some(new_tag) = &rule.new_tag {
                    tag = Some(new_tag.clone());
                }
            }
        }
        let reference = match tag {
            Some(tag) => format!("{name}:{tag}"),
            None => name,
        };
        images.insert(original.clone(), reference);
    }
    Ok(images.into_values().collect())
}

/// The capabilities the agent's DaemonSet adds (`capabilities.add` of its container in
/// `deploy/kubernetes/base/agent/daemonset.yaml`): the one place the proven set is written.
pub fn agent_capabilities() -> anyhow::Result<Vec<String>> {
    let path = kubernetes_dir().join("base/agent/daemonset.yaml");
    let daemonset = read_yaml(&path)?;
    let add = daemonset
        .pointer("/spec/template/spec/containers/0/securityContext/capabilities/add")
        .and_then(Value::as_array)
        .with_context(|| format!("no capabilities.add in {}", path.display()))?;
    add.iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .with_context(|| format!("a capability that is not a string in {}", path.display()))
        })
        .collect()
}

/// Every pod template of a workload (DaemonSet, Deployment, StatefulSet, ReplicaSet, Job,
/// CronJob) or the pod spec of a Pod, with its JSON pointer, else nothing.
pub fn pod_spec(object: &Value) -> Option<&Value> {
    match str_at(object, "/kind") {
        "Pod" => object.get("spec"),
        "CronJob" => object.pointer("/spec/jobTemplate/spec/template/spec"),
        "DaemonSet" | "Deployment" | "StatefulSet" | "ReplicaSet" | "Job" => {
            object.pointer("/spec/template/spec")
        }
        _ => None,
    }
}

/// Every container of a pod spec (init, regular and ephemeral containers).
pub fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .filter_map(|key| pod.get(key).and_then(Value::as_array))
        .flatten()
}
