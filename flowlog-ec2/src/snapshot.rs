//! One poll's view of address ownership, and the changes between two views.
//!
//! A [`Snapshot`] maps `(owner key, prefix)` to the owner's identity, built from the network
//! interfaces (every address an ENI holds) and the instances (names and tags of the instances
//! they are attached to). The owner key is `eni/<eni-id>/<instance-id>`, or `eni/<eni-id>/-` for
//! an ENI attached to no instance: it names the *pair* of interface and instance, so an ENI moved
//! to another instance is a new owner (the old pair closes, the new one opens) even though the
//! interface and its addresses stayed the same.
//!
//! [`diff`] turns two snapshots, seen by the polls at `p` (the old one) and `t` (the new one),
//! into [`OwnershipChange`]s dated at `t`:
//! - a key only in the old snapshot closes, a key only in the new one opens (a secondary IP
//!   assigned or unassigned opens or closes just that /32; an Elastic IP re-associated closes on
//!   the old ENI and opens on the new one);
//! - a key in both whose identity changed (tags, name) closes and reopens, so flows before the
//!   poll keep the identity they had;
//! - a **handover** — a prefix closed by one owner and opened by another in the same diff (an
//!   ENI moved to another instance, an Elastic IP re-associated) — happened at some unseen time
//!   between the two polls: the new owner opens at `p + 1`, not `t`, so that the two tenures
//!   overlap over `(p, t)` and a flow in between is `ambiguous` between them, never given to the
//!   old owner by a guess. An address that was only released, or only taken, changes at `t`: no
//!   other owner is possible in between, so nobody else is named;
//! - every Close comes before every Open.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use aws_sdk_ec2::types::{Instance, NetworkInterface, NetworkInterfaceType, Tag};
use flowlog_identity::OwnershipChange;
use flowlog_record::{Identity, IdentityKind};
use ipnet::IpNet;

use crate::EC2_SOURCE;

/// `(owner key, prefix) → identity`, ordered so that diffs come out in a stable order.
pub type Snapshot = BTreeMap<(String, IpNet), Arc<Identity>>;

/// What a snapshot needs to know about an instance: its name and the allow-listed tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// The `Name` tag, or the instance id without one.
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The allow-listed tags of a resource, as identity labels.
fn labels(tags: &[Tag], allow: &[String]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?, t.value().unwrap_or_default())))
        .filter(|(k, _)| allow.iter().any(|a| a == k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Instance id → name and labels, from DescribeInstances.
pub fn instance_infos<'a>(
    instances: impl IntoIterator<Item = &'a Instance>,
    tag_labels: &[String],
) -> HashMap<String, InstanceInfo> {
    instances
        .into_iter()
        .filter_map(|i| {
            let id = i.instance_id()?;
            let name = i
                .tags()
                .iter()
                .find(|t| t.key() == Some("Name"))
                .and_then(Tag::value)
                .filter(|v| !v.is_empty())
                .unwrap_or(id);
            Some((
                id.to_owned(),
                InstanceInfo {
                    name: name.to_owned(),
                    labels: labels(i.tags(), tag_labels),
                },
            ))
        })
        .collect()
}

/// Whether an ENI belongs to a load balancer: NLB and GWLB ENIs say so in their type; ALB and
/// classic ELB ENIs are plain `interface`s requested by `amazon-elb`, described `ELB <name>`.
fn is_load_balancer(eni: &NetworkInterface) -> bool {
    matches!(
        eni.interface_type(),
        Some(
            NetworkInterfaceType::LoadBalancer
                | NetworkInterfaceType::NetworkLoadBalancer
                | NetworkInterfaceType::GatewayLoadBalancer
        )
    ) || eni.requester_id() == Some("amazon-elb")
        || eni.description().is_some_and(|d| d.starts_with("ELB "))
}

/// A load balancer's name from its ENI's description: `ELB app/<name>/<id>`,
/// `ELB net/<name>/<id>`, `ELB gwy/<name>/<id>` or (classic) `ELB <name>`; the ENI id if the
/// description says nothing usable.
fn load_balancer_name(eni: &NetworkInterface, eni_id: &str) -> String {
    let Some(rest) = eni.description().and_then(|d| d.strip_prefix("ELB ")) else {
        return eni_id.to_owned();
    };
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(_kind), Some(name), Some(_id)) if !name.is_empty() => name.to_owned(),
        _ if !rest.is_empty() => rest.to_owned(),
        _ => eni_id.to_owned(),
    }
}

/// Parses an address or a prefix from the API; `None` for anything else (never seen from EC2;
/// skipped rather than failing the whole poll).
fn prefix_of(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .ok()
}

/// Every prefix an ENI holds: its private IPv4 addresses (primary and secondary), delegated IPv4
/// and IPv6 prefixes, IPv6 addresses, and the public or Elastic IPs associated with the ENI or
/// with any of its private addresses.
fn eni_prefixes(eni: &NetworkInterface) -> Vec<IpNet> {
    let mut texts: Vec<&str> = Vec::new();
    texts.extend(eni.private_ip_address());
    for p in eni.private_ip_addresses() {
        texts.extend(p.private_ip_address());
        texts.extend(p.association().and_then(|a| a.public_ip()));
    }
    texts.extend(eni.association().and_then(|a| a.public_ip()));
    texts.extend(eni.ipv6_addresses().iter().filter_map(|a| a.ipv6_address()));
    texts.extend(eni.ipv4_prefixes().iter().filter_map(|p| p.ipv4_prefix()));
    texts.extend(eni.ipv6_prefixes().iter().filter_map(|p| p.ipv6_prefix()));
    let mut prefixes: Vec<IpNet> = texts.into_iter().filter_map(prefix_of).collect();
    prefixes.sort();
    prefixes.dedup();
    prefixes
}

/// The owner key of an ENI: `eni/<eni-id>/<instance-id or ->`.
pub fn owner_key(eni_id: &str, instance_id: Option<&str>) -> String {
    format!("eni/{eni_id}/{}", instance_id.unwrap_or("-"))
}

/// What [`build`] needs besides the API's answers.
#[derive(Debug, Clone, Copy)]
pub struct BuildContext<'a> {
    /// Tags copied into identities' labels.
    pub tag_labels: &'a [String],
    /// The region polled (EC2 does not repeat it per ENI).
    pub region: Option<&'a str>,
}

/// The identity of whatever holds `eni`'s addresses:
/// - attached to an instance → `Instance`, named by its `Name` tag (or its id), with its tags
///   (an instance missing from DescribeInstances — launched between the two calls, or in
///   another VPC than its ENI — is named by its id, without tags);
/// - a load balancer's ENI → `LoadBalancer`, named by the load balancer, with the ENI's tags;
/// - anything else (unattached, or attached to a managed service) → `NetworkInterface`, named
///   by the ENI id, with the ENI's tags.
///
/// Place (VPC, subnet, zone) and account come from the ENI, which is where the addresses live.
fn identity(
    eni: &NetworkInterface,
    eni_id: &str,
    instances: &HashMap<String, InstanceInfo>,
    cx: &BuildContext<'_>,
) -> Identity {
    let instance_id = eni.attachment().and_then(|a| a.instance_id());
    let (kind, name, labels) = match instance_id {
        Some(id) => match instances.get(id) {
            Some(info) => (
                IdentityKind::Instance,
                info.name.clone(),
                info.labels.clone(),
            ),
            None => (IdentityKind::Instance, id.to_owned(), BTreeMap::new()),
        },
        None if is_load_balancer(eni) => (
            IdentityKind::LoadBalancer,
            load_balancer_name(eni, eni_id),
            labels(eni.tag_set(), cx.tag_labels),
        ),
        None => (
            IdentityKind::NetworkInterface,
            eni_id.to_owned(),
            labels(eni.tag_set(), cx.tag_labels),
        ),
    };
    Identity {
        kind,
        name,
        labels,
        zone: eni.availability_zone().map(str::to_owned),
        region: cx.region.map(str::to_owned),
        account: eni.owner_id().map(str::to_owned),
        vpc: eni.vpc_id().map(str::to_owned),
        subnet: eni.subnet_id().map(str::to_owned),
        instance_id: instance_id.map(str::to_owned),
        source: EC2_SOURCE.to_owned(),
        ..Identity::default()
    }
}

/// The snapshot of one poll: every prefix of every ENI, owned by its `(ENI, instance)` pair.
pub fn build<'a>(
    enis: impl IntoIterator<Item = &'a NetworkInterface>,
    instances: &HashMap<String, InstanceInfo>,
    cx: &BuildContext<'_>,
) -> Snapshot {
    let mut snapshot = Snapshot::new();
    for eni in enis {
        let Some(eni_id) = eni.network_interface_id() else {
            continue;
        };
        let prefixes = eni_prefixes(eni);
        if prefixes.is_empty() {
            continue;
        }
        let owner = owner_key(eni_id, eni.attachment().and_then(|a| a.instance_id()));
        let identity = Arc::new(identity(eni, eni_id, instances, cx));
        for prefix in prefixes {
            snapshot.insert((owner.clone(), prefix), Arc::clone(&identity));
        }
    }
    snapshot
}

/// The changes that turn `old` (seen by the poll at `previous_ns`, `None` before the first
/// poll) into `new` (seen at `at_ns`): all Closes, then all Opens, dated at `at_ns` except the
/// new owners of handed-over prefixes, dated just after `previous_ns` (see the module's rules).
/// No Watermark: the caller adds it once the whole poll succeeded.
pub fn diff(
    old: &Snapshot,
    new: &Snapshot,
    previous_ns: Option<u64>,
    at_ns: u64,
) -> Vec<OwnershipChange> {
    let mut closes = Vec::new();
    let mut opens = Vec::new();
    // Prefixes closed by an owner, with that owner: an Open of one by another is a handover.
    let mut closed: HashMap<IpNet, Vec<&str>> = HashMap::new();
    for ((owner, prefix), identity) in old {
        let gone = new
            .get(&(owner.clone(), *prefix))
            .is_none_or(|now| **now != **identity);
        if gone {
            closed.entry(*prefix).or_default().push(owner.as_str());
            closes.push(OwnershipChange::Close {
                source: EC2_SOURCE.to_owned(),
                owner: owner.clone(),
                prefix: *prefix,
                at_ns,
            });
        }
    }
    for ((owner, prefix), identity) in new {
        let fresh = old
            .get(&(owner.clone(), *prefix))
            .is_none_or(|was| **was != **identity);
        if fresh {
            let handover = closed
                .get(prefix)
                .is_some_and(|owners| owners.iter().any(|o| *o != owner.as_str()));
            let from = match previous_ns {
                Some(p) if handover => p.saturating_add(1).min(at_ns),
                _ => at_ns,
            };
            opens.push(OwnershipChange::Open {
                source: EC2_SOURCE.to_owned(),
                owner: owner.clone(),
                prefix: *prefix,
                identity: Arc::clone(identity),
                at_ns: from,
            });
        }
    }
    closes.append(&mut opens);
    closes
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::{
        Ipv4PrefixSpecification, NetworkInterfaceAssociation, NetworkInterfaceAttachment,
        NetworkInterfaceIpv6Address, NetworkInterfacePrivateIpAddress,
    };

    use super::*;

    fn tag(k: &str, v: &str) -> Tag {
        Tag::builder().key(k).value(v).build()
    }

    fn allow() -> Vec<String> {
        vec!["Name".into(), "app".into()]
    }

    fn cx(allow: &[String]) -> BuildContext<'_> {
        BuildContext {
            tag_labels: allow,
            region: Some("eu-west-1"),
        }
    }

    fn private(ip: &str, public: Option<&str>) -> NetworkInterfacePrivateIpAddress {
        let mut b = NetworkInterfacePrivateIpAddress::builder().private_ip_address(ip);
        if let Some(p) = public {
            b = b.association(NetworkInterfaceAssociation::builder().public_ip(p).build());
        }
        b.build()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn place(id: Identity) -> Identity {
        Identity {
            zone: Some("eu-west-1a".into()),
            region: Some("eu-west-1".into()),
            account: Some("111122223333".into()),
            vpc: Some("vpc-1".into()),
            subnet: Some("subnet-1".into()),
            source: "ec2".into(),
            ..id
        }
    }

    fn eni(id: &str) -> aws_sdk_ec2::types::builders::NetworkInterfaceBuilder {
        NetworkInterface::builder()
            .network_interface_id(id)
            .availability_zone("eu-west-1a")
            .owner_id("111122223333")
            .vpc_id("vpc-1")
            .subnet_id("subnet-1")
    }

    #[test]
    fn an_instance_eni_holds_every_address_it_has() {
        let allow = allow();
        let instance = Instance::builder()
            .instance_id("i-1")
            .tags(tag("Name", "web-1"))
            .tags(tag("app", "web"))
            .tags(tag("cost-centre", "42"))
            .build();
        let instances = instance_infos([&instance], &allow);
        let e = eni("eni-1")
            .attachment(
                NetworkInterfaceAttachment::builder()
                    .instance_id("i-1")
                    .build(),
            )
            .private_ip_address("10.0.0.5")
            .private_ip_addresses(private("10.0.0.5", Some("203.0.113.5")))
            .private_ip_addresses(private("10.0.0.6", Some("203.0.113.6")))
            .association(
                NetworkInterfaceAssociation::builder()
                    .public_ip("203.0.113.5")
                    .build(),
            )
            .ipv6_addresses(
                NetworkInterfaceIpv6Address::builder()
                    .ipv6_address("2001:db8::5")
                    .build(),
            )
            .ipv4_prefixes(
                Ipv4PrefixSpecification::builder()
                    .ipv4_prefix("10.0.1.16/28")
                    .build(),
            )
            .tag_set(tag("app", "ignored-for-instances"))
            .build();
        let snapshot = build([&e], &instances, &cx(&allow));
        let expected_identity = place(Identity {
            kind: IdentityKind::Instance,
            name: "web-1".into(),
            labels: [("Name", "web-1"), ("app", "web")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            instance_id: Some("i-1".into()),
            ..Identity::default()
        });
        let expected: Vec<((String, IpNet), Identity)> = [
            "10.0.0.5/32",
            "10.0.0.6/32",
            "10.0.1.16/28",
            "203.0.113.5/32",
            "203.0.113.6/32",
            "2001:db8::5/128",
        ]
        .into_iter()
        .map(|p| {
            (
                ("eni/eni-1/i-1".to_owned(), net(p)),
                expected_identity.clone(),
            )
        })
        .collect();
        let got: Vec<((String, IpNet), Identity)> = snapshot
            .into_iter()
            .map(|(k, v)| (k, (*v).clone()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn unknown_instances_load_balancers_and_loose_enis() {
        let allow = allow();
        let attached_unknown = eni("eni-a")
            .attachment(
                NetworkInterfaceAttachment::builder()
                    .instance_id("i-new")
                    .build(),
            )
            .private_ip_address("10.0.0.1")
            .build();
        let alb = eni("eni-b")
            .interface_type(NetworkInterfaceType::Interface)
            .requester_id("amazon-elb")
            .description("ELB app/shop-front/50dc6c495c0c9188")
            .private_ip_address("10.0.0.2")
            .tag_set(tag("app", "shop"))
            .build();
        let classic = eni("eni-c")
            .description("ELB legacy-lb")
            .private_ip_address("10.0.0.3")
            .build();
        let nlb = eni("eni-d")
            .interface_type(NetworkInterfaceType::NetworkLoadBalancer)
            .description("ELB net/edge/0123")
            .private_ip_address("10.0.0.4")
            .build();
        let loose = eni("eni-e")
            .description("spare")
            .private_ip_address("10.0.0.5")
            .tag_set(tag("Name", "spare-nic"))
            .tag_set(tag("team", "not-allowed"))
            .build();
        let snapshot = build(
            [&attached_unknown, &alb, &classic, &nlb, &loose],
            &HashMap::new(),
            &cx(&allow),
        );
        // owner, prefix, kind, name, labels, instance id
        type Row = (
            String,
            IpNet,
            IdentityKind,
            String,
            Vec<(String, String)>,
            Option<String>,
        );
        let got: Vec<Row> = snapshot
            .iter()
            .map(|((o, p), i)| {
                (
                    o.clone(),
                    *p,
                    i.kind,
                    i.name.clone(),
                    i.labels.clone().into_iter().collect(),
                    i.instance_id.clone(),
                )
            })
            .collect();
        let s = |x: &str| x.to_owned();
        assert_eq!(
            got,
            vec![
                (
                    s("eni/eni-a/i-new"),
                    net("10.0.0.1/32"),
                    IdentityKind::Instance,
                    s("i-new"),
                    vec![],
                    Some(s("i-new"))
                ),
                (
                    s("eni/eni-b/-"),
                    net("10.0.0.2/32"),
                    IdentityKind::LoadBalancer,
                    s("shop-front"),
                    vec![(s("app"), s("shop"))],
                    None
                ),
                (
                    s("eni/eni-c/-"),
                    net("10.0.0.3/32"),
                    IdentityKind::LoadBalancer,
                    s("legacy-lb"),
                    vec![],
                    None
                ),
                (
                    s("eni/eni-d/-"),
                    net("10.0.0.4/32"),
                    IdentityKind::LoadBalancer,
                    s("edge"),
                    vec![],
                    None
                ),
                (
                    s("eni/eni-e/-"),
                    net("10.0.0.5/32"),
                    IdentityKind::NetworkInterface,
                    s("eni-e"),
                    vec![(s("Name"), s("spare-nic"))],
                    None
                ),
            ]
        );
    }

    fn id(name: &str) -> Arc<Identity> {
        Arc::new(Identity {
            kind: IdentityKind::Instance,
            name: name.into(),
            source: "ec2".into(),
            ..Identity::default()
        })
    }

    fn snap(entries: &[(&str, &str, &Arc<Identity>)]) -> Snapshot {
        entries
            .iter()
            .map(|(o, p, i)| (((*o).to_owned(), net(p)), Arc::clone(i)))
            .collect()
    }

    fn open(owner: &str, prefix: &str, identity: &Arc<Identity>, at_ns: u64) -> OwnershipChange {
        OwnershipChange::Open {
            source: "ec2".into(),
            owner: owner.into(),
            prefix: net(prefix),
            identity: Arc::clone(identity),
            at_ns,
        }
    }

    fn close(owner: &str, prefix: &str, at_ns: u64) -> OwnershipChange {
        OwnershipChange::Close {
            source: "ec2".into(),
            owner: owner.into(),
            prefix: net(prefix),
            at_ns,
        }
    }

    #[test]
    fn diff_closes_before_it_opens_and_reopens_changed_identities() {
        let (a, b, a2) = (id("a"), id("b"), id("a-renamed"));
        let old = snap(&[
            ("eni/eni-1/i-a", "10.0.0.1/32", &a),
            ("eni/eni-1/i-a", "10.0.0.2/32", &a),
            ("eni/eni-2/i-b", "10.0.0.3/32", &b),
            ("eni/eni-3/i-c", "10.0.0.4/32", &a),
        ]);
        let new = snap(&[
            // eni-1 moved from i-a to i-b; its secondary 10.0.0.2 was unassigned on the way.
            ("eni/eni-1/i-b", "10.0.0.1/32", &b),
            // unchanged
            ("eni/eni-2/i-b", "10.0.0.3/32", &b),
            // a new secondary address
            ("eni/eni-2/i-b", "10.0.0.9/32", &b),
            // retagged
            ("eni/eni-3/i-c", "10.0.0.4/32", &a2),
        ]);
        assert_eq!(
            diff(&old, &new, Some(4), 7),
            vec![
                close("eni/eni-1/i-a", "10.0.0.1/32", 7),
                close("eni/eni-1/i-a", "10.0.0.2/32", 7),
                close("eni/eni-3/i-c", "10.0.0.4/32", 7),
                // A handover (another owner closed this prefix): from just after the last poll.
                open("eni/eni-1/i-b", "10.0.0.1/32", &b, 5),
                open("eni/eni-2/i-b", "10.0.0.9/32", &b, 7),
                // The same owner retagged: not a handover.
                open("eni/eni-3/i-c", "10.0.0.4/32", &a2, 7),
            ]
        );
        assert_eq!(diff(&new, &new, Some(7), 8), vec![]);
        // Before the first poll there is no earlier view to date a handover from.
        assert_eq!(
            diff(&old, &new, None, 7)[3],
            open("eni/eni-1/i-b", "10.0.0.1/32", &b, 7)
        );
    }
}
