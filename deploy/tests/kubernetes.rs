//! The Kubernetes manifests (deploy/kubernetes/): every overlay renders with `kubectl
//! kustomize`, every object validates against the API schemas of Kubernetes 1.30 to 1.33
//! (`kubernetes-validate --strict`), the custom resources (KEDA, Prometheus Operator) name
//! what exists, every overlay meets the security posture (`flowlog_deploy::posture`), and each
//! posture check fails on a manifest broken for it.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use flowlog_deploy::{
    kubernetes::{
        KUBERNETES_VERSIONS, agent_capabilities, containers, expected_images, is_custom_resource,
        kubernetes_dir, kustomize, object_id, overlays, parse_objects, pod_spec, str_at, validate,
    },
    posture::{Level, Policy, check, pod_security_level},
    repo_root,
};
use serde_json::{Value, json};

/// A rendering to check: a name for messages, and its kustomization directory.
fn renderings() -> Vec<(String, PathBuf)> {
    let mut all: Vec<(String, PathBuf)> = overlays()
        .unwrap()
        .into_iter()
        .map(|dir| (dir.file_name().unwrap().to_string_lossy().into_owned(), dir))
        .collect();
    all.push(("dev+podmonitor".to_string(), podmonitor_kustomization()));
    all
}

/// A kustomization of overlays/dev with components/podmonitor (an optional component no
/// overlay includes), made under the target directory (one directory for every run; its file
/// is replaced atomically, so concurrent tests and runs read a whole one).
fn podmonitor_kustomization() -> PathBuf {
    let dir = flowlog_deploy::binaries_dir().join("kustomize-podmonitor");
    std::fs::create_dir_all(&dir).unwrap();
    let k = kubernetes_dir();
    let text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
        relative(&dir, &k.join("overlays/dev")).display(),
        relative(&dir, &k.join("components/podmonitor")).display()
    );
    let tmp = dir.join(format!(
        "kustomization.yaml.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("kustomization.yaml")).unwrap();
    dir
}

/// `to` as a path relative to the directory `from` (kustomize refuses absolute paths).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (from.canonicalize().unwrap(), to.canonicalize().unwrap());
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut path = PathBuf::new();
    for _ in from.components().skip(common) {
        path.push("..");
    }
    path.extend(to.components().skip(common));
    path
}

fn render(dir: &Path) -> Vec<Value> {
    parse_objects(&kustomize(dir).unwrap()).unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| str_at(o, "/kind") == kind && str_at(o, "/metadata/name") == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The value of an environment variable of a workload's first container: its `value`, or
/// `configMap:KEY`/`field:PATH` for a reference.
fn env(workload: &Value, name: &str) -> Option<String> {
    let container = pod_spec(workload)?.pointer("/containers/0")?;
    let var = container
        .get("env")?
        .as_array()?
        .iter()
        .find(|e| str_at(e, "/name") == name)?;
    if let Some(v) = var.get("value").and_then(Value::as_str) {
        return Some(v.to_string());
    }
    if let Some(key) = var
        .pointer("/valueFrom/configMapKeyRef/key")
        .and_then(Value::as_str)
    {
        return Some(format!("configMap:{key}"));
    }
    var.pointer("/valueFrom/fieldRef/fieldPath")
        .and_then(Value::as_str)
        .map(|p| format!("field:{p}"))
}

#[test]
fn the_overlays_are_dev_eks_and_keda() {
    let names: Vec<String> = overlays()
        .unwrap()
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["dev", "eks", "keda"]);
}

#[test]
fn every_object_of_every_overlay_validates_on_kubernetes_1_30_to_1_33() {
    for (name, dir) in renderings() {
        let objects = render(&dir);
        // kubernetes-validate has no schemas for custom resources (it would only warn): they
        // are left out here and checked in `custom_resources_name_what_exists`.
        let (custom, builtin): (Vec<Value>, Vec<Value>) =
            objects.into_iter().partition(is_custom_resource);
        let mut expected: Vec<String> = builtin.iter().map(object_id).collect();
        expected.sort();
        std::thread::scope(|s| {
            let runs: Vec<_> = KUBERNETES_VERSIONS
                .iter()
                .map(|version| (version, s.spawn(|| validate(&builtin, version).unwrap())))
                .collect();
            for (version, run) in runs {
                let validation = run.join().unwrap();
                assert!(
                    validation.success,
                    "{name} on {version}:\n{}",
                    validation.output
                );
                assert_eq!(
                    validation.passed, expected,
                    "{name} on {version}:\n{}",
                    validation.output
                );
            }
        });
        eprintln!(
            "{name}: {} objects valid on Kubernetes {}; {} custom resources not validated",
            builtin.len(),
            KUBERNETES_VERSIONS.join(", "),
            custom.len()
        );
    }
}

#[test]
fn custom_resources_name_what_exists() {
    let keda = render(&kubernetes_dir().join("overlays/keda"));
    // KEDA replaces the CPU autoscaler: two autoscalers on one Deployment would fight.
    assert!(
        !keda
            .iter()
            .any(|o| str_at(o, "/kind") == "HorizontalPodAutoscaler")
    );
    let scaled = find(&keda, "ScaledObject", "flowlog-enricher");
    assert_eq!(str_at(scaled, "/spec/scaleTargetRef/kind"), "Deployment");
    let enricher = find(&keda, "Deployment", "flowlog-enricher");
    assert_eq!(
        str_at(scaled, "/spec/scaleTargetRef/name"),
        "flowlog-enricher"
    );
    let trigger = scaled.pointer("/spec/triggers/0").unwrap();
    assert_eq!(str_at(trigger, "/type"), "kafka");
    // The trigger watches the lag of the group and topic the enricher consumes, on its brokers.
    assert_eq!(
        env(enricher, "FLOWLOG_GROUP").unwrap(),
        str_at(trigger, "/metadata/consumerGroup")
    );
    assert_eq!(
        env(enricher, "FLOWLOG_INPUT_TOPIC").unwrap(),
        str_at(trigger, "/metadata/topic")
    );
    let settings = keda
        .iter()
        .find(|o| {
            str_at(o, "/kind") == "ConfigMap"
                && str_at(o, "/metadata/namespace") == "flowlog"
                && str_at(o, "/metadata/name").starts_with("flowlog-settings-")
        })
        .unwrap();
    assert_eq!(
        str_at(trigger, "/metadata/bootstrapServers"),
        str_at(settings, "/data/FLOWLOG_KAFKA_BROKERS")
    );
    assert!(str_at(trigger, "/metadata/bootstrapServers").ends_with(":9096"));
    find(
        &keda,
        "TriggerAuthentication",
        str_at(trigger, "/authenticationRef/name"),
    );

    let monitored = render(&podmonitor_kustomization());
    let monitor = find(&monitored, "PodMonitor", "flowlog");
    let port = str_at(monitor, "/spec/podMetricsEndpoints/0/port");
    let label = str_at(
        monitor,
        "/spec/selector/matchLabels/app.kubernetes.io~1part-of",
    );
    let namespaces: BTreeSet<&str> = monitor
        .pointer("/spec/namespaceSelector/matchNames")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    // Every flowlog workload is selected and has the scraped port.
    let mut selected = BTreeSet::new();
    for workload in monitored.iter().filter(|o| pod_spec(o).is_some()) {
        let labels = workload.pointer("/spec/template/metadata/labels").unwrap();
        assert_eq!(labels["app.kubernetes.io/part-of"], label);
        assert!(namespaces.contains(str_at(workload, "/metadata/namespace")));
        let ports = &pod_spec(workload).unwrap()["containers"][0]["ports"];
        assert!(ports.as_array().unwrap().iter().any(|p| p["name"] == port));
        selected.insert(str_at(workload, "/metadata/name").to_string());
    }
    assert_eq!(
        selected,
        BTreeSet::from(
            ["flowlog-agent", "flowlog-enricher", "flowlog-inventory"].map(String::from)
        )
    );
}

#[test]
fn every_overlay_meets_the_posture() {
    let capabilities = agent_capabilities().unwrap();
    for (name, dir) in renderings() {
        let objects = render(&dir);
        let overlay = if name == "dev+podmonitor" {
            kubernetes_dir().join("overlays/dev")
        } else {
            dir.clone()
        };
        let policy = Policy::flowlog(&capabilities, expected_images(&overlay).unwrap());
        let violations = check(&objects, &policy);
        assert!(violations.is_empty(), "{name}:\n{}", violations.join("\n"));
        // The checks saw the three workloads, at the Pod Security level of their namespace.
        let levels: BTreeMap<String, Level> = objects
            .iter()
            .filter_map(|o| {
                Some((
                    str_at(o, "/metadata/name").to_string(),
                    pod_security_level(pod_spec(o)?),
                ))
            })
            .collect();
        assert_eq!(
            levels,
            BTreeMap::from([
                ("flowlog-agent".to_string(), Level::Privileged),
                ("flowlog-enricher".to_string(), Level::Restricted),
                ("flowlog-inventory".to_string(), Level::Restricted),
            ]),
            "{name}"
        );
        eprintln!("{name}: posture ok, images {:?}", policy.images);
    }
}

#[test]
fn images_follow_each_overlays_images_list() {
    assert_eq!(
        expected_images(&kubernetes_dir().join("overlays/dev")).unwrap(),
        BTreeSet::from(
            [
                "flowlog/flowlog-agent:0.1.0",
                "flowlog/flowlog-enricher:0.1.0"
            ]
            .map(String::from)
        )
    );
    let ecr = BTreeSet::from(
        [
            "ACCOUNT_ID.dkr.ecr.REGION.amazonaws.com/flowlog/flowlog-agent:0.1.0",
            "ACCOUNT_ID.dkr.ecr.REGION.amazonaws.com/flowlog/flowlog-enricher:0.1.0",
        ]
        .map(String::from),
    );
    assert_eq!(
        expected_images(&kubernetes_dir().join("overlays/eks")).unwrap(),
        ecr
    );
    assert_eq!(
        expected_images(&kubernetes_dir().join("overlays/keda")).unwrap(),
        ecr
    );
}

#[test]
fn inventory_rbac_grants_list_and_watch_on_what_flowlog_kubernetes_watches_and_the_lease() {
    let objects = render(&kubernetes_dir().join("overlays/dev"));
    // flowlog-kubernetes/src/source.rs: kube watchers (list + watch, all namespaces) of Pods,
    // Services, Nodes and discovery.k8s.io EndpointSlices.
    assert_eq!(
        find(&objects, "ClusterRole", "flowlog-inventory")["rules"],
        json!([
            {"apiGroups": [""], "resources": ["pods", "services", "nodes"], "verbs": ["list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        ])
    );
    let lease = find(&objects, "Role", "flowlog-inventory-lease");
    assert_eq!(str_at(lease, "/metadata/namespace"), "flowlog");
    assert_eq!(
        lease["rules"],
        json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "resourceNames": ["flowlog-inventory"], "verbs": ["get", "update"]},
        ])
    );
    let inventory = find(&objects, "Deployment", "flowlog-inventory");
    assert_eq!(
        env(inventory, "FLOWLOG_LEASE_NAME").as_deref(),
        Some("flowlog-inventory")
    );
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let binding = objects
            .iter()
            .find(|o| str_at(o, "/kind") == kind)
            .unwrap_or_else(|| panic!("no {kind}"));
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "flowlog-inventory", "namespace": "flowlog"}])
        );
    }
    assert_eq!(
        str_at(inventory, "/spec/template/spec/serviceAccountName"),
        "flowlog-inventory"
    );
}

/// The interfaces the binaries read (their flags' environment variables), per overlay.
#[test]
fn each_workload_gets_the_settings_its_binary_reads() {
    for overlay in ["dev", "eks", "keda"] {
        let objects = render(&kubernetes_dir().join("overlays").join(overlay));
        let agent = find(&objects, "DaemonSet", "flowlog-agent");
        let enricher = find(&objects, "Deployment", "flowlog-enricher");
        let inventory = find(&objects, "Deployment", "flowlog-inventory");
        let expect = |workload: &Value, pairs: &[(&str, Option<&str>)]| {
            for (name, value) in pairs {
                assert_eq!(
                    env(workload, name).as_deref(),
                    *value,
                    "{overlay}: {} {name}",
                    str_at(workload, "/metadata/name")
                );
            }
        };
        let tls = overlay != "dev";
        let kafka_config = tls.then_some("/etc/flowlog/kafka/client.properties");
        expect(
            agent,
            &[
                ("FLOWLOG_OUTPUT", Some("kafka")),
                ("FLOWLOG_HOST", Some("field:spec.nodeName")),
                ("FLOWLOG_METRICS_ADDR", Some("0.0.0.0:9464")),
                ("FLOWLOG_SPOOL_DIR", Some("/var/lib/flowlog/spool")),
                ("FLOWLOG_TRACEFS", Some("/sys/kernel/tracing")),
                ("FLOWLOG_BTF", Some("/sys/kernel/btf/vmlinux")),
                (
                    "FLOWLOG_KAFKA_BROKERS",
                    Some("configMap:FLOWLOG_KAFKA_BROKERS"),
                ),
                ("FLOWLOG_KAFKA_CONFIG", kafka_config),
            ],
        );
        expect(
            enricher,
            &[
                ("FLOWLOG_METRICS_ADDR", Some("0.0.0.0:9465")),
                ("FLOWLOG_OWNERSHIP_TOPIC", Some("flows.ownership")),
                (
                    "FLOWLOG_KAFKA_BROKERS",
                    Some("configMap:FLOWLOG_KAFKA_BROKERS"),
                ),
                ("FLOWLOG_KAFKA_CONFIG", kafka_config),
                (
                    "FLOWLOG_PARQUET",
                    Some(if tls {
                        "configMap:FLOWLOG_PARQUET"
                    } else {
                        "/var/lib/flowlog/parquet"
                    }),
                ),
                (
                    "FLOWLOG_S3_REGION",
                    tls.then_some("configMap:FLOWLOG_AWS_REGION"),
                ),
            ],
        );
        expect(
            inventory,
            &[
                ("FLOWLOG_METRICS_ADDR", Some("0.0.0.0:9466")),
                ("FLOWLOG_KUBERNETES", Some("true")),
                ("FLOWLOG_LEADER_ELECTION", Some("true")),
                ("FLOWLOG_LEASE_NAMESPACE", Some("field:metadata.namespace")),
                ("FLOWLOG_LEASE_IDENTITY", Some("field:metadata.name")),
                ("FLOWLOG_KAFKA_CONFIG", kafka_config),
                ("FLOWLOG_EC2", tls.then_some("true")),
                (
                    "FLOWLOG_EC2_REGION",
                    tls.then_some("configMap:FLOWLOG_AWS_REGION"),
                ),
            ],
        );
        // The Kafka client file comes from the Secret flowlog-kafka where Kafka needs TLS, and
        // no Secret is mounted at all in dev.
        for workload in [agent, enricher, inventory] {
            let pod = pod_spec(workload).unwrap();
            let secrets: Vec<&str> = pod
                .get("volumes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.pointer("/secret/secretName").and_then(Value::as_str))
                .collect();
            assert_eq!(
                secrets,
                if tls { vec!["flowlog-kafka"] } else { vec![] },
                "{overlay}"
            );
            let mounted = containers(pod)
                .flat_map(|c| c["volumeMounts"].as_array().cloned().unwrap_or_default())
                .any(|m| m["mountPath"] == "/etc/flowlog/kafka" && m["readOnly"] == true);
            assert_eq!(mounted, tls, "{overlay}");
        }
        assert_eq!(
            str_at(inventory, "/spec/template/spec/containers/0/command/0"),
            "/usr/bin/flowlog-inventory"
        );
        assert_eq!(inventory["spec"]["replicas"], 2);
    }
}

/// README's capability table has one row per capability the DaemonSet adds, and no other.
#[test]
fn readme_documents_each_agent_capability() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let rows: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `CAP_"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_string)
        .collect();
    let added: BTreeSet<String> = agent_capabilities().unwrap().into_iter().collect();
    assert_eq!(rows, added);
}

// ---- each posture check fails on a manifest broken for it ------------------------------------

/// A small flowlog-shaped set of objects that meets the posture: the namespaces, an agent
/// DaemonSet, an enricher Deployment and the inventory's RBAC.
const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {pod-security.kubernetes.io/enforce: restricted}}
---
apiVersion: v1
kind: Namespace
metadata: {name: agent, labels: {pod-security.kubernetes.io/enforce: privileged}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: a, namespace: agent}
spec:
  template:
    metadata: {labels: {app.kubernetes.io/name: flowlog-agent}}
    spec:
      securityContext: {seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: agent
          image: reg/agent:1
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            runAsUser: 0
            capabilities: {drop: [ALL], add: [BPF, PERFMON]}
          resources: {requests: {cpu: 1m, memory: 1Mi}, limits: {cpu: 1m, memory: 1Mi}}
          livenessProbe: {httpGet: {path: /healthz, port: 1}}
          readinessProbe: {httpGet: {path: /readyz, port: 1}}
          volumeMounts:
            - {name: tracefs, mountPath: /sys/kernel/tracing, readOnly: true}
            - {name: state, mountPath: /var/lib/flowlog}
      volumes:
        - {name: tracefs, hostPath: {path: /sys/kernel/tracing}}
        - {name: state, hostPath: {path: /var/lib/flowlog}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: e, namespace: app}
spec:
  template:
    metadata: {labels: {app.kubernetes.io/name: flowlog-enricher}}
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: enricher
          image: reg/enricher:1
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
          resources: {requests: {cpu: 1m, memory: 1Mi}, limits: {cpu: 1m, memory: 1Mi}}
          livenessProbe: {httpGet: {path: /healthz, port: 1}}
          readinessProbe: {httpGet: {path: /readyz, port: 1}}
      volumes:
        - {name: kafka, secret: {secretName: s}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: c}
rules:
  - {apiGroups: [""], resources: [pods], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: r, namespace: app}
rules:
  - {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, create, update]}
"#;

fn good() -> Vec<Value> {
    parse_objects(GOOD).unwrap()
}

fn test_policy() -> Policy {
    Policy::flowlog(
        &["BPF".to_string(), "PERFMON".to_string()],
        BTreeSet::from(["reg/agent:1".to_string(), "reg/enricher:1".to_string()]),
    )
}

/// The violations after `f` broke object `index` of [`GOOD`].
fn broken(index: usize, f: impl FnOnce(&mut Value)) -> Vec<String> {
    let mut objects = good();
    f(&mut objects[index]);
    check(&objects, &test_policy())
}

fn at<'a>(object: &'a mut Value, pointer: &str) -> &'a mut Value {
    object
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer}"))
}

const AGENT: usize = 2;
const ENRICHER: usize = 3;
const CLUSTER_ROLE: usize = 4;
const ROLE: usize = 5;
const AGENT_C: &str = "/spec/template/spec/containers/0";
const ENRICHER_C: &str = "/spec/template/spec/containers/0";

#[test]
fn posture_passes_the_good_manifest() {
    assert_eq!(check(&good(), &test_policy()), Vec::<String>::new());
}

#[test]
fn posture_fails_a_privileged_container() {
    let v = broken(ENRICHER, |o| {
        at(o, &format!("{ENRICHER_C}/securityContext"))["privileged"] = json!(true)
    });
    assert_eq!(
        v,
        [
            "Deployment app/e container enricher: privileged",
            "Deployment app/e: needs Pod Security level Privileged, namespace app enforces Restricted",
        ]
    );
}

#[test]
fn posture_fails_host_namespaces() {
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        let v = broken(AGENT, |o| at(o, "/spec/template/spec")[key] = json!(true));
        assert_eq!(v, [format!("DaemonSet agent/a: {key} is true")]);
    }
}

#[test]
fn posture_fails_capabilities_other_than_the_documented_set() {
    let v = broken(AGENT, |o| {
        at(o, &format!("{AGENT_C}/securityContext/capabilities/add"))
            .as_array_mut()
            .unwrap()
            .push(json!("SYS_ADMIN"))
    });
    assert_eq!(
        v,
        [
            r#"DaemonSet agent/a container agent: capabilities.add is {"BPF", "PERFMON", "SYS_ADMIN"}, not {"BPF", "PERFMON"}"#
        ]
    );
    let v = broken(AGENT, |o| {
        *at(o, &format!("{AGENT_C}/securityContext/capabilities/add")) = json!(["BPF"])
    });
    assert_eq!(
        v,
        [
            r#"DaemonSet agent/a container agent: capabilities.add is {"BPF"}, not {"BPF", "PERFMON"}"#
        ]
    );
    let v = broken(ENRICHER, |o| {
        at(o, &format!("{ENRICHER_C}/securityContext/capabilities"))["add"] = json!(["CHOWN"])
    });
    assert_eq!(
        v,
        [
            r#"Deployment app/e container enricher: capabilities.add is {"CHOWN"}, not {}"#,
            "Deployment app/e: needs Pod Security level Baseline, namespace app enforces Restricted",
        ]
    );
    let v = broken(ENRICHER, |o| {
        *at(
            o,
            &format!("{ENRICHER_C}/securityContext/capabilities/drop"),
        ) = json!(["NET_RAW"])
    });
    assert_eq!(
        v,
        [
            r#"Deployment app/e container enricher: capabilities.drop is {"NET_RAW"}, not ["ALL"]"#,
            "Deployment app/e: needs Pod Security level Baseline, namespace app enforces Restricted",
        ]
    );
}

#[test]
fn posture_fails_missing_resources_and_probes() {
    let v = broken(ENRICHER, |o| {
        at(o, &format!("{ENRICHER_C}/resources"))
            .as_object_mut()
            .unwrap()
            .remove("limits");
    });
    assert_eq!(
        v,
        [
            "Deployment app/e container enricher: no resources.limits.cpu",
            "Deployment app/e container enricher: no resources.limits.memory",
        ]
    );
    let v = broken(AGENT, |o| {
        at(o, AGENT_C)
            .as_object_mut()
            .unwrap()
            .remove("readinessProbe");
    });
    assert_eq!(
        v,
        [
            "DaemonSet agent/a container agent: readinessProbe is not an HTTP GET of /readyz (found None)"
        ]
    );
    let v = broken(AGENT, |o| {
        *at(o, &format!("{AGENT_C}/livenessProbe/httpGet/path")) = json!("/metrics")
    });
    assert_eq!(
        v,
        [
            r#"DaemonSet agent/a container agent: livenessProbe is not an HTTP GET of /healthz (found Some("/metrics"))"#
        ]
    );
}

#[test]
fn posture_fails_a_writable_root_file_system_and_privilege_escalation() {
    let v = broken(AGENT, |o| {
        at(o, &format!("{AGENT_C}/securityContext"))["readOnlyRootFilesystem"] = json!(false)
    });
    assert_eq!(
        v,
        ["DaemonSet agent/a container agent: readOnlyRootFilesystem is not true"]
    );
    let v = broken(ENRICHER, |o| {
        at(o, &format!("{ENRICHER_C}/securityContext"))
            .as_object_mut()
            .unwrap()
            .remove("allowPrivilegeEscalation");
    });
    assert_eq!(
        v,
        [
            "Deployment app/e container enricher: allowPrivilegeEscalation is not false",
            "Deployment app/e: needs Pod Security level Baseline, namespace app enforces Restricted",
        ]
    );
}

#[test]
fn posture_fails_root_outside_the_agent() {
    let v = broken(ENRICHER, |o| {
        at(o, "/spec/template/spec/securityContext")
            .as_object_mut()
            .unwrap()
            .remove("runAsNonRoot");
    });
    assert_eq!(
        v,
        [
            "Deployment app/e container enricher: runAsNonRoot is not true",
            "Deployment app/e: needs Pod Security level Baseline, namespace app enforces Restricted",
        ]
    );
    let v = broken(ENRICHER, |o| {
        at(o, &format!("{ENRICHER_C}/securityContext"))["runAsUser"] = json!(0)
    });
    assert_eq!(
        v,
        [
            "Deployment app/e container enricher: runAsUser is 0",
            "Deployment app/e: needs Pod Security level Baseline, namespace app enforces Restricted",
        ]
    );
}

#[test]
fn posture_fails_host_paths_outside_the_agent_or_not_read_only() {
    let v = broken(ENRICHER, |o| {
        at(o, "/spec/template/spec/volumes")
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "h", "hostPath": {"path": "/var/lib/flowlog"}}));
    });
    assert_eq!(
        v,
        [
            "Deployment app/e: hostPath volume h (/var/lib/flowlog)",
            "Deployment app/e: needs Pod Security level Privileged, namespace app enforces Restricted",
        ]
    );
    let v = broken(AGENT, |o| {
        at(o, &format!("{AGENT_C}/volumeMounts/0"))
            .as_object_mut()
            .unwrap()
            .remove("readOnly");
    });
    assert_eq!(
        v,
        [
            "DaemonSet agent/a container agent: hostPath /sys/kernel/tracing is not mounted read-only"
        ]
    );
    let v = broken(AGENT, |o| {
        *at(o, "/spec/template/spec/volumes/1/hostPath/path") = json!("/")
    });
    assert_eq!(v, ["DaemonSet agent/a: hostPath volume state (/)"]);
}

#[test]
fn posture_fails_images_not_in_the_kustomization() {
    let v = broken(ENRICHER, |o| {
        *at(o, &format!("{ENRICHER_C}/image")) = json!("docker.io/library/busybox")
    });
    assert_eq!(
        v,
        [
            r#"Deployment app/e container enricher: image "docker.io/library/busybox" is not one of the kustomization's images {"reg/agent:1", "reg/enricher:1"}"#
        ]
    );
}

#[test]
fn posture_fails_a_pod_above_its_namespaces_level() {
    // The agent moved into the restricted namespace.
    let v = broken(AGENT, |o| *at(o, "/metadata/namespace") = json!("app"));
    assert_eq!(
        v,
        ["DaemonSet app/a: needs Pod Security level Privileged, namespace app enforces Restricted"]
    );
    let v = broken(AGENT, |o| {
        *at(o, "/spec/template/spec/securityContext/seccompProfile/type") = json!("Unconfined")
    });
    assert_eq!(
        v,
        [
            r#"DaemonSet agent/a container agent: seccompProfile is Some("Unconfined"), not RuntimeDefault"#
        ]
    );
}

#[test]
fn posture_fails_rbac_beyond_reading_and_the_lease() {
    let v = broken(CLUSTER_ROLE, |o| {
        *at(o, "/rules/0/verbs") = json!(["list", "watch", "delete"])
    });
    assert_eq!(
        v,
        [r#"ClusterRole c rule 0: verbs {"delete"} beyond get/list/watch"#]
    );
    // create/update are the Lease's only, in a Role.
    let v = broken(
        CLUSTER_ROLE,
        |o| *at(o, "/rules/0") = json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]}),
    );
    assert_eq!(
        v,
        [r#"ClusterRole c rule 0: verbs {"create"} beyond get/list/watch"#]
    );
    let v = broken(ROLE, |o| {
        *at(o, "/rules/0/resources") = json!(["leases", "secrets"])
    });
    assert_eq!(
        v,
        [r#"Role app/r rule 0: verbs {"create", "update"} beyond get/list/watch"#]
    );
    let v = broken(ROLE, |o| *at(o, "/rules/0/verbs") = json!(["*"]));
    assert_eq!(
        v,
        [
            "Role app/r rule 0: verbs has a wildcard",
            r#"Role app/r rule 0: verbs {"*"} beyond get/list/watch"#,
        ]
    );
}
