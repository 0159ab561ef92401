//! Fixtures on a real EC2-compatible API server (moto, started by `scripts/moto start`; endpoint
//! from `FLOWLOG_TEST_EC2`, default `http://127.0.0.1:5000`): a VPC and subnet of the test's own
//! (so that tests sharing one server see only their own ENIs, through the source's `vpc-id`
//! filter), instances and ENIs with explicit private IPs (moto's random ones can repeat), Elastic
//! IPs. Everything created is removed when the fixture drops, even after a failed assertion.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    sync::Arc,
    time::Duration,
};

use flowlog_ec2::aws_sdk_ec2::{
    Client,
    types::{InstanceType, ResourceType, Tag, TagSpecification},
};
use flowlog_ec2::{ClientOptions, Ec2Settings, StaticCredentials, build_client};
use flowlog_identity::OwnershipChange;
use flowlog_record::{Identity, IdentityKind};
use ipnet::IpNet;

pub const REGION: &str = "us-east-1";
pub const ZONE: &str = "us-east-1a";
/// moto's account.
pub const ACCOUNT: &str = "123456789012";

/// The moto endpoint; unreachable is a failure with directions, not a skip.
pub fn endpoint() -> String {
    let endpoint =
        std::env::var("FLOWLOG_TEST_EC2").unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned());
    let host = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let reachable = host
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(
        reachable,
        "no EC2-compatible server at {endpoint} (FLOWLOG_TEST_EC2): run `scripts/moto start` \
         (or `scripts/moto start PORT` and export FLOWLOG_TEST_EC2=http://127.0.0.1:PORT)"
    );
    endpoint
}

/// The socket address of an `http://host:port` endpoint.
pub fn socket_addr(endpoint: &str) -> SocketAddr {
    endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap()
}

/// A client for `endpoint` with static credentials; `max_attempts` 1 shows failures at once.
pub async fn client(endpoint: &str, max_attempts: u32) -> Client {
    build_client(&ClientOptions {
        region: Some(REGION.into()),
        endpoint: Some(endpoint.into()),
        credentials: Some(StaticCredentials {
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
            session_token: None,
        }),
        max_attempts,
        ..ClientOptions::default()
    })
    .await
}

/// Source settings that see only `vpc`.
pub fn settings(vpc: &str) -> Ec2Settings {
    Ec2Settings {
        interval: Duration::from_millis(200),
        vpc_ids: vec![vpc.to_owned()],
        region: Some(REGION.into()),
        ..Ec2Settings::default()
    }
}

pub fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

pub fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub fn open(owner: &str, prefix: &str, identity: &Identity, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Open {
        source: "ec2".into(),
        owner: owner.into(),
        prefix: net(prefix),
        identity: Arc::new(identity.clone()),
        at_ns,
    }
}

pub fn close(owner: &str, prefix: &str, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Close {
        source: "ec2".into(),
        owner: owner.into(),
        prefix: net(prefix),
        at_ns,
    }
}

pub fn watermark(at_ns: u64) -> OwnershipChange {
    OwnershipChange::Watermark {
        source: "ec2".into(),
        at_ns,
    }
}

/// Changes in a canonical order (Closes, Opens, Watermarks; each by owner and prefix), for
/// comparing sets of changes whose owners carry random ids. Also checks the source's own
/// promise that every Close comes before every Open.
pub fn canonical(mut changes: Vec<OwnershipChange>) -> Vec<OwnershipChange> {
    let first_open = changes
        .iter()
        .position(|c| matches!(c, OwnershipChange::Open { .. }));
    if let Some(first_open) = first_open {
        assert!(
            changes[first_open..]
                .iter()
                .all(|c| !matches!(c, OwnershipChange::Close { .. })),
            "a Close after an Open: {changes:#?}"
        );
    }
    let key = |c: &OwnershipChange| match c {
        OwnershipChange::Close { owner, prefix, .. } => (0, owner.clone(), Some(*prefix)),
        OwnershipChange::Open { owner, prefix, .. } => (1, owner.clone(), Some(*prefix)),
        OwnershipChange::Watermark { .. } => (2, String::new(), None),
        // EC2 dates every change by its poll: it never knows a change only to within a span.
        OwnershipChange::Uncertain { .. } => panic!("the EC2 source sent an uncertain span: {c:?}"),
    };
    changes.sort_by_key(key);
    changes
}

/// An instance as the fixture made it.
#[derive(Debug, Clone)]
pub struct TestInstance {
    pub id: String,
    /// Its primary ENI.
    pub eni: String,
}

/// A VPC and subnet of one test, and what the test created in them.
pub struct Fixture {
    pub client: Client,
    endpoint: String,
    pub vpc: String,
    pub subnet: String,
    instances: Vec<String>,
    enis: Vec<String>,
    allocations: Vec<String>,
}

impl Fixture {
    /// A VPC `cidr` (unique per test) with one subnet `subnet_cidr` in [`ZONE`].
    pub async fn new(endpoint: &str, cidr: &str, subnet_cidr: &str) -> Self {
        let client = &client(endpoint, 3).await;
        let vpc = client
            .create_vpc()
            .cidr_block(cidr)
            .send()
            .await
            .expect("CreateVpc")
            .vpc
            .and_then(|v| v.vpc_id)
            .unwrap();
        let subnet = client
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(subnet_cidr)
            .availability_zone(ZONE)
            .send()
            .await
            .expect("CreateSubnet")
            .subnet
            .and_then(|s| s.subnet_id)
            .unwrap();
        Self {
            client: client.clone(),
            endpoint: endpoint.to_owned(),
            vpc,
            subnet,
            instances: Vec::new(),
            enis: Vec::new(),
            allocations: Vec::new(),
        }
    }

    /// An instance in the subnet with primary address `ip` and `tags`.
    pub async fn instance(&mut self, ip: &str, tags: &[(&str, &str)]) -> TestInstance {
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (k, v) in tags {
            spec = spec.tags(Tag::builder().key(*k).value(*v).build());
        }
        let out = self
            .client
            .run_instances()
            .image_id("ami-12345678")
            .instance_type(InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .subnet_id(&self.subnet)
            .private_ip_address(ip)
            .tag_specifications(spec.build())
            .send()
            .await
            .expect("RunInstances");
        let instance = &out.instances()[0];
        let id = instance.instance_id().unwrap().to_owned();
        self.instances.push(id.clone());
        let eni = instance.network_interfaces()[0]
            .network_interface_id()
            .unwrap()
            .to_owned();
        // AWS deletes a primary ENI with its instance; moto keeps it: delete it at cleanup.
        self.enis.push(eni.clone());
        TestInstance { id, eni }
    }

    /// A loose ENI with primary address `ip`.
    pub async fn eni(&mut self, ip: &str) -> String {
        let id = self
            .client
            .create_network_interface()
            .subnet_id(&self.subnet)
            .private_ip_address(ip)
            .send()
            .await
            .expect("CreateNetworkInterface")
            .network_interface
            .and_then(|n| n.network_interface_id)
            .unwrap();
        self.enis.push(id.clone());
        id
    }

    /// Attaches `eni` to `instance` as device 1; returns the attachment id.
    pub async fn attach(&self, eni: &str, instance: &TestInstance) -> String {
        self.client
            .attach_network_interface()
            .network_interface_id(eni)
            .instance_id(&instance.id)
            .device_index(1)
            .send()
            .await
            .expect("AttachNetworkInterface")
            .attachment_id
            .unwrap()
    }

    pub async fn detach(&self, attachment: &str) {
        self.client
            .detach_network_interface()
            .attachment_id(attachment)
            .send()
            .await
            .expect("DetachNetworkInterface");
    }

    pub async fn assign(&self, eni: &str, ip: &str) {
        self.client
            .assign_private_ip_addresses()
            .network_interface_id(eni)
            .private_ip_addresses(ip)
            .send()
            .await
            .expect("AssignPrivateIpAddresses");
    }

    pub async fn unassign(&self, eni: &str, ip: &str) {
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni)
            .private_ip_addresses(ip)
            .send()
            .await
            .expect("UnassignPrivateIpAddresses");
    }

    /// Sets tag `key` of a resource to `value`.
    pub async fn tag(&self, resource: &str, key: &str, value: &str) {
        self.client
            .create_tags()
            .resources(resource)
            .tags(Tag::builder().key(key).value(value).build())
            .send()
            .await
            .expect("CreateTags");
    }

    /// A VPC Elastic IP: (allocation id, public address).
    pub async fn elastic_ip(&mut self) -> (String, String) {
        let out = self
            .client
            .allocate_address()
            .domain(flowlog_ec2::aws_sdk_ec2::types::DomainType::Vpc)
            .send()
            .await
            .expect("AllocateAddress");
        let allocation = out.allocation_id().unwrap().to_owned();
        self.allocations.push(allocation.clone());
        (allocation, out.public_ip().unwrap().to_owned())
    }

    /// Associates an Elastic IP with an instance (its primary ENI); returns the association id.
    pub async fn associate(&self, allocation: &str, instance: &TestInstance) -> String {
        self.client
            .associate_address()
            .allocation_id(allocation)
            .instance_id(&instance.id)
            .send()
            .await
            .expect("AssociateAddress")
            .association_id
            .unwrap()
    }

    pub async fn disassociate(&self, association: &str) {
        self.client
            .disassociate_address()
            .association_id(association)
            .send()
            .await
            .expect("DisassociateAddress");
    }

    /// The identity the source should give an instance of this fixture named `name` with the
    /// allow-listed `labels`, written out from the fixture (not from the code under test).
    pub fn instance_identity(
        &self,
        instance: &TestInstance,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Identity {
        Identity {
            kind: IdentityKind::Instance,
            name: name.into(),
            labels: tags(labels),
            zone: Some(ZONE.into()),
            region: Some(REGION.into()),
            account: Some(ACCOUNT.into()),
            vpc: Some(self.vpc.clone()),
            subnet: Some(self.subnet.clone()),
            instance_id: Some(instance.id.clone()),
            source: "ec2".into(),
            ..Identity::default()
        }
    }

    async fn cleanup(
        endpoint: String,
        vpc: String,
        subnet: String,
        instances: Vec<String>,
        enis: Vec<String>,
        allocations: Vec<String>,
    ) {
        // Best effort, in dependency order; a leftover only costs moto memory. A client of its
        // own: the test's may hold connections driven by the test's (now blocked) runtime.
        let client = client(&endpoint, 1).await;
        for a in &allocations {
            let _ = client.release_address().allocation_id(a).send().await;
        }
        if !instances.is_empty() {
            let _ = client
                .terminate_instances()
                .set_instance_ids(Some(instances))
                .send()
                .await;
        }
        for e in &enis {
            let _ = client
                .delete_network_interface()
                .network_interface_id(e)
                .send()
                .await;
        }
        let _ = client.delete_subnet().subnet_id(subnet).send().await;
        let _ = client.delete_vpc().vpc_id(vpc).send().await;
    }
}

impl Drop for Fixture {
    /// Removes what the test made, on a thread of its own (Drop cannot await, and may run
    /// inside the test's runtime).
    fn drop(&mut self) {
        let args = (
            self.endpoint.clone(),
            self.vpc.clone(),
            self.subnet.clone(),
            std::mem::take(&mut self.instances),
            std::mem::take(&mut self.enis),
            std::mem::take(&mut self.allocations),
        );
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(Fixture::cleanup(
                    args.0, args.1, args.2, args.3, args.4, args.5,
                ))
        })
        .join();
    }
}
