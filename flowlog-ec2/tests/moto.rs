//! The EC2 source against a real EC2-compatible API server (moto): instances, secondary
//! addresses, ENIs moved between instances, Elastic IPs re-associated, pagination. Each test
//! polls by hand at chosen times (`Ec2Source::poll`), so expected changes are exact; expected
//! identities are written out from the fixtures. Each test has its own VPC (unique CIDR) and
//! removes what it created.
mod common;

use common::*;
use flowlog_ec2::Ec2Source;
use flowlog_identity::{IdentityIndex, OwnershipChange};
use flowlog_record::{Attribution, Identity};

/// Applies `changes` to `index`.
fn apply(index: &mut IdentityIndex, changes: &[OwnershipChange]) {
    for c in changes {
        index.apply(c.clone());
    }
}

/// The candidates `index` names for `addr` at `at_ns` if it is ambiguous there.
fn candidates(index: &IdentityIndex, addr: &str, at_ns: u64) -> Option<Vec<String>> {
    let end = index.lookup(addr.parse().unwrap(), at_ns);
    (end.status == Attribution::Ambiguous).then_some(end.candidates)
}

/// The identity `index` gives `addr` at `at_ns`, if exactly one.
fn owner(index: &IdentityIndex, addr: &str, at_ns: u64) -> Option<Identity> {
    let end = index.lookup(addr.parse().unwrap(), at_ns);
    match end.status {
        Attribution::Exact => end.identity.map(|i| (*i).clone()),
        Attribution::Unknown => None,
        Attribution::Ambiguous => panic!("{addr} at {at_ns} is ambiguous: {:?}", end.candidates),
    }
}

#[tokio::test]
async fn instances_are_named_by_their_name_tag_with_allow_listed_tags() {
    let endpoint = endpoint();
    let mut fx = Fixture::new(&endpoint, "10.61.0.0/16", "10.61.1.0/24").await;
    let a = fx
        .instance(
            "10.61.1.10",
            &[("Name", "web-a"), ("app", "web"), ("cost-centre", "42")],
        )
        .await;
    let b = fx
        .instance("10.61.1.11", &[("Name", "db-b"), ("team", "data")])
        .await;
    // No Name tag: named by its id.
    let c = fx.instance("10.61.1.12", &[("app", "batch")]).await;

    let mut source = Ec2Source::new(client(&endpoint, 3).await, settings(&fx.vpc));
    let first = source.poll(1_000).await.expect("first poll");
    let id_a = fx.instance_identity(&a, "web-a", &[("Name", "web-a"), ("app", "web")]);
    let id_b = fx.instance_identity(&b, "db-b", &[("Name", "db-b"), ("team", "data")]);
    let id_c = fx.instance_identity(&c, &c.id, &[("app", "batch")]);
    assert_eq!(
        canonical(first),
        canonical(vec![
            open(
                &format!("eni/{}/{}", a.eni, a.id),
                "10.61.1.10/32",
                &id_a,
                1_000
            ),
            open(
                &format!("eni/{}/{}", b.eni, b.id),
                "10.61.1.11/32",
                &id_b,
                1_000
            ),
            open(
                &format!("eni/{}/{}", c.eni, c.id),
                "10.61.1.12/32",
                &id_c,
                1_000
            ),
            watermark(1_000),
        ])
    );
    // Nothing changed: only the watermark moves.
    assert_eq!(source.poll(2_000).await.unwrap(), vec![watermark(2_000)]);

    // Retagged: the same owner closes and reopens with the new identity at the poll, so flows
    // before it keep the old labels.
    fx.tag(&a.id, "app", "web-v2").await;
    let id_a2 = fx.instance_identity(&a, "web-a", &[("Name", "web-a"), ("app", "web-v2")]);
    let owner_a = format!("eni/{}/{}", a.eni, a.id);
    assert_eq!(
        source.poll(3_000).await.unwrap(),
        vec![
            close(&owner_a, "10.61.1.10/32", 3_000),
            open(&owner_a, "10.61.1.10/32", &id_a2, 3_000),
            watermark(3_000),
        ]
    );
}

#[tokio::test]
async fn a_secondary_address_opens_and_closes_alone() {
    let endpoint = endpoint();
    let mut fx = Fixture::new(&endpoint, "10.62.0.0/16", "10.62.1.0/24").await;
    let a = fx.instance("10.62.1.10", &[("Name", "app-a")]).await;
    let owner_a = format!("eni/{}/{}", a.eni, a.id);
    let id_a = fx.instance_identity(&a, "app-a", &[("Name", "app-a")]);

    let mut source = Ec2Source::new(client(&endpoint, 3).await, settings(&fx.vpc));
    assert_eq!(
        source.poll(1_000).await.unwrap(),
        vec![
            open(&owner_a, "10.62.1.10/32", &id_a, 1_000),
            watermark(1_000)
        ]
    );
    fx.assign(&a.eni, "10.62.1.20").await;
    assert_eq!(
        source.poll(2_000).await.unwrap(),
        vec![
            open(&owner_a, "10.62.1.20/32", &id_a, 2_000),
            watermark(2_000)
        ]
    );
    fx.unassign(&a.eni, "10.62.1.20").await;
    assert_eq!(
        source.poll(3_000).await.unwrap(),
        vec![close(&owner_a, "10.62.1.20/32", 3_000), watermark(3_000)]
    );
}

#[tokio::test]
async fn an_eni_moved_between_instances_is_either_owner_between_the_two_polls() {
    let endpoint = endpoint();
    let mut fx = Fixture::new(&endpoint, "10.63.0.0/16", "10.63.1.0/24").await;
    let a = fx.instance("10.63.1.10", &[("Name", "web-a")]).await;
    let b = fx.instance("10.63.1.11", &[("Name", "web-b")]).await;
    let moving = fx.eni("10.63.1.50").await;
    let attachment = fx.attach(&moving, &a).await;
    let id_a = fx.instance_identity(&a, "web-a", &[("Name", "web-a")]);
    let id_b = fx.instance_identity(&b, "web-b", &[("Name", "web-b")]);
    let (on_a, on_b) = (
        format!("eni/{moving}/{}", a.id),
        format!("eni/{moving}/{}", b.id),
    );

    let mut index = IdentityIndex::new();
    index.register_source("ec2");
    let mut source = Ec2Source::new(client(&endpoint, 3).await, settings(&fx.vpc));
    let first = source.poll(1_000).await.unwrap();
    assert_eq!(
        canonical(first.clone()),
        canonical(vec![
            open(
                &format!("eni/{}/{}", a.eni, a.id),
                "10.63.1.10/32",
                &id_a,
                1_000
            ),
            open(
                &format!("eni/{}/{}", b.eni, b.id),
                "10.63.1.11/32",
                &id_b,
                1_000
            ),
            open(&on_a, "10.63.1.50/32", &id_a, 1_000),
            watermark(1_000),
        ])
    );
    apply(&mut index, &first);
    assert_eq!(owner(&index, "10.63.1.50", 1_500), Some(id_a.clone()));

    // Detached from A and attached to B between two polls: one poll sees the handover, which
    // happened at some time after the poll at 1,000: B holds it from just after that poll, A
    // until this one, and in between it is either.
    fx.detach(&attachment).await;
    fx.attach(&moving, &b).await;
    let second = source.poll(2_000).await.unwrap();
    assert_eq!(
        second,
        vec![
            close(&on_a, "10.63.1.50/32", 2_000),
            open(&on_b, "10.63.1.50/32", &id_b, 1_001),
            watermark(2_000),
        ]
    );
    apply(&mut index, &second);
    let both = Some(vec![id_a.name.clone(), id_b.name.clone()]);
    assert_eq!(owner(&index, "10.63.1.50", 999), None);
    assert_eq!(owner(&index, "10.63.1.50", 1_000), Some(id_a.clone()));
    assert_eq!(candidates(&index, "10.63.1.50", 1_001), both);
    assert_eq!(candidates(&index, "10.63.1.50", 1_999), both);
    assert_eq!(owner(&index, "10.63.1.50", 2_000), Some(id_b.clone()));
    assert_eq!(owner(&index, "10.63.1.50", 5_000), Some(id_b));
    assert_eq!(index.caught_up_to(), Some(2_000));
}

#[tokio::test]
async fn an_elastic_ip_moves_with_its_association() {
    let endpoint = endpoint();
    let mut fx = Fixture::new(&endpoint, "10.64.0.0/16", "10.64.1.0/24").await;
    let a = fx.instance("10.64.1.10", &[("Name", "edge-a")]).await;
    let b = fx.instance("10.64.1.11", &[("Name", "edge-b")]).await;
    let (allocation, public) = fx.elastic_ip().await;
    let association = fx.associate(&allocation, &a).await;
    let id_a = fx.instance_identity(&a, "edge-a", &[("Name", "edge-a")]);
    let id_b = fx.instance_identity(&b, "edge-b", &[("Name", "edge-b")]);
    let (owner_a, owner_b) = (
        format!("eni/{}/{}", a.eni, a.id),
        format!("eni/{}/{}", b.eni, b.id),
    );
    let public_32 = format!("{public}/32");

    let mut index = IdentityIndex::new();
    index.register_source("ec2");
    let mut source = Ec2Source::new(client(&endpoint, 3).await, settings(&fx.vpc));
    let first = source.poll(1_000).await.unwrap();
    assert_eq!(
        canonical(first.clone()),
        canonical(vec![
            open(&owner_a, "10.64.1.10/32", &id_a, 1_000),
            open(&owner_a, &public_32, &id_a, 1_000),
            open(&owner_b, "10.64.1.11/32", &id_b, 1_000),
            watermark(1_000),
        ])
    );
    apply(&mut index, &first);

    // Re-associated to B between two polls (moto keeps the address on the old ENI too when
    // re-associating with AllowReassociation, so the test disassociates first; the poller sees
    // the same thing either way on AWS).
    fx.disassociate(&association).await;
    fx.associate(&allocation, &b).await;
    let second = source.poll(2_000).await.unwrap();
    assert_eq!(
        second,
        vec![
            close(&owner_a, &public_32, 2_000),
            open(&owner_b, &public_32, &id_b, 1_001),
            watermark(2_000),
        ]
    );
    apply(&mut index, &second);
    assert_eq!(owner(&index, &public, 1_000), Some(id_a.clone()));
    assert_eq!(
        candidates(&index, &public, 1_999),
        Some(vec![id_a.name.clone(), id_b.name.clone()])
    );
    assert_eq!(owner(&index, &public, 2_000), Some(id_b));
}

#[tokio::test]
async fn every_page_is_read() {
    const INSTANCES: usize = 7;
    let endpoint = endpoint();
    let mut fx = Fixture::new(&endpoint, "10.65.0.0/16", "10.65.1.0/24").await;
    let mut expected = vec![watermark(1_000)];
    for i in 0..INSTANCES {
        let name = format!("node-{i}");
        let ip = format!("10.65.1.{}", 10 + i);
        let instance = fx.instance(&ip, &[("Name", &name)]).await;
        let identity = fx.instance_identity(&instance, &name, &[("Name", &name)]);
        expected.push(open(
            &format!("eni/{}/{}", instance.eni, instance.id),
            &format!("{ip}/32"),
            &identity,
            1_000,
        ));
    }
    // Pages of 5: DescribeInstances answers 7 reservations in two pages (names come only from
    // there, so a missed page would show as instances named by their ids). moto ignores
    // MaxResults on DescribeNetworkInterfaces and answers in one page; the paginator code path
    // is the same for both calls.
    let mut source = Ec2Source::new(
        client(&endpoint, 3).await,
        flowlog_ec2::Ec2Settings {
            max_results: Some(5),
            ..settings(&fx.vpc)
        },
    );
    assert_eq!(
        canonical(source.poll(1_000).await.unwrap()),
        canonical(expected)
    );
}
