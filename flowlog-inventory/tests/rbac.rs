//! Least privilege, proven: the API calls `flowlog-inventory --leader-election` makes — recorded
//! by the test API server as Kubernetes' RBAC authorizer sees them — against the rules of the
//! ClusterRole `flowlog-inventory` and the Role `flowlog-inventory-lease` rendered from the
//! manifests (`kubectl kustomize deploy/kubernetes/overlays/dev`, read with the deploy tests' YAML
//! reader). The inventory is taken through leadership (it creates the Lease), a
//! re-list after `410 Gone`, a takeover by the standby after a kill, and a release on SIGTERM.
//! Exact both ways: every call made is granted, and every verb on every resource (and name) a
//! rule grants was used.
mod inventory_support;

use std::{collections::BTreeSet, time::Instant};

use flowlog_testkit::{
    Topic,
    kubernetes::{ApiCall, ApiServer, Kind},
};
use inventory_support::*;
use serde_json::Value;

/// The rules the calls of this test need, for the message when the manifests are missing.
const EXPECTED: &str = "ClusterRole flowlog-inventory: apiGroups [\"\"] resources [pods, \
services, nodes] verbs [list, watch]; apiGroups [discovery.k8s.io] resources [endpointslices] \
verbs [list, watch]. Role flowlog-inventory-lease in the inventory's namespace: apiGroups \
[coordination.k8s.io] resources [leases] verbs [create]; apiGroups [coordination.k8s.io] \
resources [leases] resourceNames [flowlog-inventory] verbs [get, update] (create cannot be \
limited to a name)";

/// Every object of the dev overlay, as JSON (rendered and read by the deploy tests' helpers).
fn rendered() -> Vec<Value> {
    let dir = flowlog_deploy::kubernetes::kubernetes_dir();
    assert!(
        dir.is_dir(),
        "deploy/kubernetes is missing: this test compares the inventory's API calls with the \
         rules rendered from deploy/kubernetes/overlays/dev. Expected exactly: {EXPECTED}"
    );
    let yaml = flowlog_deploy::kubernetes::kustomize(&dir.join("overlays/dev"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    flowlog_deploy::kubernetes::parse_objects(&yaml).unwrap_or_else(|e| panic!("{e:#}"))
}

/// One RBAC rule.
#[derive(Debug)]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    resource_names: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The rules of the `kind` named `name`, and its namespace.
fn role(objects: &[Value], kind: &str, name: &str) -> (Option<String>, Vec<Rule>) {
    let object = objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the dev overlay. Expected: {EXPECTED}"));
    let rules = object["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Rule {
            api_groups: strings(&r["apiGroups"]),
            resources: strings(&r["resources"]),
            verbs: strings(&r["verbs"]),
            resource_names: strings(&r["resourceNames"]),
        })
        .collect::<Vec<_>>();
    for rule in &rules {
        assert!(
            ![&rule.api_groups, &rule.resources, &rule.verbs]
                .iter()
                .any(|list| list.iter().any(|s| s == "*")),
            "{kind} {name} grants a wildcard: {rule:?}"
        );
    }
    (
        object["metadata"]["namespace"].as_str().map(String::from),
        rules,
    )
}

impl Rule {
    fn covers(&self, call: &ApiCall) -> bool {
        self.api_groups.contains(&call.api_group)
            && self.resources.contains(&call.resource)
            && self.verbs.contains(&call.verb)
            && (self.resource_names.is_empty()
                || call
                    .name
                    .as_ref()
                    .is_some_and(|n| self.resource_names.contains(n)))
    }

    /// Every single permission the rule grants, as (group, resource, verb, name).
    fn grants(&self) -> Vec<(String, String, String, Option<String>)> {
        let names: Vec<Option<String>> = match self.resource_names.is_empty() {
            true => vec![None],
            false => self.resource_names.iter().cloned().map(Some).collect(),
        };
        let mut out = Vec::new();
        for g in &self.api_groups {
            for r in &self.resources {
                for v in &self.verbs {
                    for n in &names {
                        out.push((g.clone(), r.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
        out
    }
}

/// Whether `call` exercised the single permission `grant` (a grant without a name is used by
/// a call on any name or none).
fn uses(call: &ApiCall, grant: &(String, String, String, Option<String>)) -> bool {
    let (group, resource, verb, name) = grant;
    call.api_group == *group
        && call.resource == *resource
        && call.verb == *verb
        && (name.is_none() || call.name == *name)
}

#[test]
fn the_inventory_makes_exactly_the_calls_its_roles_grant() {
    let objects = rendered();
    let (_, cluster_rules) = role(&objects, "ClusterRole", "flowlog-inventory");
    let (role_namespace, lease_rules) = role(&objects, "Role", "flowlog-inventory-lease");
    assert_eq!(
        role_namespace.as_deref(),
        Some(NAMESPACE),
        "the Role's namespace (the inventory's, where its Lease is)"
    );

    let topic = Topic::create("rbac-ownership", 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime.block_on(ApiServer::start());
    cluster(&server);
    // Leadership: the first replica creates the Lease; the second stands by.
    let mut a = replica(&server, &topic, "inventory-a", "publishing ownership");
    let b = replica(
        &server,
        &topic,
        "inventory-b",
        "standing by: the Lease is held",
    );
    let web2 = pod_owner("web-2", "10.1.0.2");
    read_tenures(&topic, |t| open(t, &web2));
    // A re-list: the pod watch is cut, history compacted, the pod deleted unseen; the resumed
    // watch gets 410 Gone and the watcher lists again.
    server.delete_unseen(Kind::Pod, "shop", "web-2");
    read_tenures(&topic, |t| closed_at(t, &web2).is_some());
    assert!(
        server.gone_responses() >= 1,
        "no watch was answered 410 Gone"
    );
    // A takeover after a kill, then a release on SIGTERM.
    a.child.0.kill().unwrap();
    a.child.0.wait().unwrap();
    wait_for(PATIENT, "the standby takes the Lease", || {
        holder_is(&server, "inventory-b")
    });
    let mut b = b;
    let stopping = Instant::now();
    assert!(
        b.child.terminate(PATIENT),
        "the leader's exit after SIGTERM"
    );
    eprintln!("the leader released and exited in {:?}", stopping.elapsed());
    assert_eq!(lease(&server), (None, 1), "released: no holder");

    let calls = server.calls();
    eprintln!("API calls made:\n{calls:#?}");
    let mut refused = Vec::new();
    for call in &calls {
        let by_cluster_role = cluster_rules.iter().any(|r| r.covers(call));
        let by_role = call.namespace.as_deref() == Some(NAMESPACE)
            && lease_rules.iter().any(|r| r.covers(call));
        if !(by_cluster_role || by_role) {
            refused.push(call);
        }
    }
    let mut unused = Vec::new();
    for rule in &cluster_rules {
        for grant in rule.grants() {
            if !calls.iter().any(|c| uses(c, &grant)) {
                unused.push(format!("ClusterRole flowlog-inventory: {grant:?}"));
            }
        }
    }
    for rule in &lease_rules {
        for grant in rule.grants() {
            if !calls
                .iter()
                .any(|c| c.namespace.as_deref() == Some(NAMESPACE) && uses(c, &grant))
            {
                unused.push(format!("Role flowlog-inventory-lease: {grant:?}"));
            }
        }
    }
    assert!(
        refused.is_empty() && unused.is_empty(),
        "calls no rule grants: {refused:#?}\ngranted but never used: {unused:#?}"
    );

    // And the calls themselves, independently of the manifests: list and watch of the four
    // watched kinds in all namespaces; get, create and update of the one Lease.
    let call =
        |verb: &str, group: &str, resource: &str, ns: Option<&str>, name: Option<&str>| ApiCall {
            verb: verb.to_string(),
            api_group: group.to_string(),
            resource: resource.to_string(),
            namespace: ns.map(String::from),
            name: name.map(String::from),
        };
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["list", "watch"] {
            expected.insert(call(verb, group, resource, None, None));
        }
    }
    let lease_group = "coordination.k8s.io";
    expected.insert(call("create", lease_group, "leases", Some(NAMESPACE), None));
    for verb in ["get", "update"] {
        expected.insert(call(
            verb,
            lease_group,
            "leases",
            Some(NAMESPACE),
            Some(LEASE),
        ));
    }
    assert_eq!(calls, expected);
}
