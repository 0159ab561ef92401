//! What moto cannot show: DescribeNetworkInterfaces answered in several pages, and a poll whose
//! last page is throttled. A small HTTP server here speaks the EC2 query protocol (form-encoded
//! requests, XML answers, `nextToken`) from canned pages, so the pages, the tokens and the
//! failure are exactly what the test says. The SDK, its paginator and its XML parser are the
//! real ones.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use flowlog_ec2::{ClientOptions, Ec2Settings, Ec2Source, ErrorKind, StaticCredentials};
use flowlog_identity::OwnershipChange;
use flowlog_record::{Identity, IdentityKind};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const PAGE_1: &str = r#"<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
<requestId>r1</requestId>
<networkInterfaceSet><item>
  <networkInterfaceId>eni-1</networkInterfaceId><availabilityZone>eu-west-1a</availabilityZone>
  <ownerId>111122223333</ownerId><vpcId>vpc-1</vpcId><subnetId>subnet-1</subnetId>
  <interfaceType>interface</interfaceType><privateIpAddress>10.9.0.1</privateIpAddress>
  <privateIpAddressesSet><item><privateIpAddress>10.9.0.1</privateIpAddress><primary>true</primary></item></privateIpAddressesSet>
  <attachment><instanceId>i-1</instanceId></attachment>
</item></networkInterfaceSet>
<nextToken>page-2</nextToken>
</DescribeNetworkInterfacesResponse>"#;

const PAGE_2: &str = r#"<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
<requestId>r2</requestId>
<networkInterfaceSet><item>
  <networkInterfaceId>eni-2</networkInterfaceId><availabilityZone>eu-west-1b</availabilityZone>
  <ownerId>111122223333</ownerId><vpcId>vpc-1</vpcId><subnetId>subnet-2</subnetId>
  <interfaceType>interface</interfaceType><requesterId>amazon-elb</requesterId>
  <description>ELB app/front/50dc6c495c0c9188</description><privateIpAddress>10.9.1.2</privateIpAddress>
  <tagSet><item><key>team</key><value>edge</value></item></tagSet>
</item></networkInterfaceSet>
<nextToken>page-3</nextToken>
</DescribeNetworkInterfacesResponse>"#;

const PAGE_3: &str = r#"<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
<requestId>r3</requestId>
<networkInterfaceSet><item>
  <networkInterfaceId>eni-3</networkInterfaceId><availabilityZone>eu-west-1a</availabilityZone>
  <ownerId>111122223333</ownerId><vpcId>vpc-1</vpcId><subnetId>subnet-1</subnetId>
  <interfaceType>interface</interfaceType><privateIpAddress>10.9.0.3</privateIpAddress>
  <ipv6AddressesSet><item><ipv6Address>2001:db8::3</ipv6Address></item></ipv6AddressesSet>
</item></networkInterfaceSet>
</DescribeNetworkInterfacesResponse>"#;

const INSTANCES: &str = r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
<requestId>r4</requestId>
<reservationSet><item><reservationId>r-1</reservationId><instancesSet><item>
  <instanceId>i-1</instanceId><tagSet><item><key>Name</key><value>one</value></item></tagSet>
</item></instancesSet></item></reservationSet>
</DescribeInstancesResponse>"#;

const THROTTLED: &str = r#"<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>r5</RequestID></Response>"#;

/// Serves the canned pages; page 3 answers "throttled" while `throttle` is set.
async fn serve(listener: TcpListener, throttle: Arc<AtomicBool>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let throttle = Arc::clone(&throttle);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            // Headers, then as many body bytes as Content-Length says.
            let body = loop {
                let n = conn.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                let Some(end) = text.find("\r\n\r\n") else {
                    continue;
                };
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    break text[end + 4..end + 4 + length].to_owned();
                }
            };
            let param = |name: &str| {
                body.split('&')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned)
            };
            let (status, xml) = match (param("Action").as_deref(), param("NextToken").as_deref()) {
                (Some("DescribeNetworkInterfaces"), None) => (200, PAGE_1),
                (Some("DescribeNetworkInterfaces"), Some("page-2")) => (200, PAGE_2),
                (Some("DescribeNetworkInterfaces"), Some("page-3"))
                    if throttle.load(Ordering::SeqCst) =>
                {
                    (503, THROTTLED)
                }
                (Some("DescribeNetworkInterfaces"), Some("page-3")) => (200, PAGE_3),
                (Some("DescribeInstances"), None) => (200, INSTANCES),
                _ => (
                    400,
                    "<Response><Errors><Error><Code>InvalidAction</Code><Message>unexpected</Message></Error></Errors></Response>",
                ),
            };
            let reason = if status == 200 { "OK" } else { "Error" };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{xml}",
                xml.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

async fn start(throttle: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, throttle));
    addr
}

fn open(owner: &str, prefix: &str, identity: &Identity, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Open {
        source: "ec2".into(),
        owner: owner.into(),
        prefix: prefix.parse().unwrap(),
        identity: Arc::new(identity.clone()),
        at_ns,
    }
}

#[tokio::test]
async fn all_pages_or_nothing() {
    let throttle = Arc::new(AtomicBool::new(true));
    let addr = start(Arc::clone(&throttle)).await;
    let client = flowlog_ec2::build_client(&ClientOptions {
        region: Some("eu-west-1".into()),
        endpoint: Some(format!("http://{addr}")),
        credentials: Some(StaticCredentials {
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
            session_token: None,
        }),
        max_attempts: 1,
        attempt_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    })
    .await;
    let mut source = Ec2Source::new(
        client,
        Ec2Settings {
            max_results: Some(5),
            ..Ec2Settings::default()
        },
    );

    // Pages 1 and 2 answered, page 3 throttled: the poll fails as a whole, sends nothing.
    let error = source.poll(1_000).await.expect_err("page 3 is throttled");
    assert_eq!(error.kind, ErrorKind::Throttled);
    assert_eq!(error.code.as_deref(), Some("RequestLimitExceeded"));
    assert_eq!(error.operation, "DescribeNetworkInterfaces");
    assert_eq!(
        error.to_string(),
        "EC2 DescribeNetworkInterfaces failed (throttled, RequestLimitExceeded): Request limit exceeded."
    );
    assert_eq!(source.failures(), 1);
    assert_eq!(source.prefixes(), 0);

    // Every page answered: everything on all three pages opens.
    throttle.store(false, Ordering::SeqCst);
    let changes = source.poll(2_000).await.expect("all pages answered");
    let place = |subnet: &str, zone: &str| Identity {
        zone: Some(zone.into()),
        region: Some("eu-west-1".into()),
        account: Some("111122223333".into()),
        vpc: Some("vpc-1".into()),
        subnet: Some(subnet.into()),
        source: "ec2".into(),
        ..Identity::default()
    };
    let one = Identity {
        kind: IdentityKind::Instance,
        name: "one".into(),
        labels: [("Name".to_owned(), "one".to_owned())].into(),
        instance_id: Some("i-1".into()),
        ..place("subnet-1", "eu-west-1a")
    };
    let front = Identity {
        kind: IdentityKind::LoadBalancer,
        name: "front".into(),
        labels: [("team".to_owned(), "edge".to_owned())].into(),
        ..place("subnet-2", "eu-west-1b")
    };
    let loose = Identity {
        kind: IdentityKind::NetworkInterface,
        name: "eni-3".into(),
        ..place("subnet-1", "eu-west-1a")
    };
    assert_eq!(
        changes,
        vec![
            open("eni/eni-1/i-1", "10.9.0.1/32", &one, 2_000),
            open("eni/eni-2/-", "10.9.1.2/32", &front, 2_000),
            open("eni/eni-3/-", "10.9.0.3/32", &loose, 2_000),
            open("eni/eni-3/-", "2001:db8::3/128", &loose, 2_000),
            OwnershipChange::Watermark {
                source: "ec2".into(),
                at_ns: 2_000,
            },
        ]
    );
    assert_eq!(source.failures(), 0);
    assert_eq!(source.prefixes(), 4);

    // Throttled again: the failed poll closes nothing (everything stays open).
    throttle.store(true, Ordering::SeqCst);
    source.poll(3_000).await.expect_err("page 3 is throttled");
    assert_eq!(source.prefixes(), 4);
    throttle.store(false, Ordering::SeqCst);
    assert_eq!(
        source.poll(4_000).await.unwrap(),
        vec![OwnershipChange::Watermark {
            source: "ec2".into(),
            at_ns: 4_000,
        }]
    );
}
