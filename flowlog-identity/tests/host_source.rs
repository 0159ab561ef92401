//! The host source on this machine: its loopback addresses resolve to its own identity, named as
//! `uname -n` names the host, opened at boot time; an unchanged host yields only a watermark.
use std::{net::IpAddr, process::Command, sync::Arc, time::Duration};

use flowlog_identity::{HostSource, IdentityIndex, InventorySource, OwnershipChange, now_ns};
use flowlog_record::{Endpoint, Identity, IdentityKind};
use tokio_util::sync::CancellationToken;

fn uname_n() -> String {
    let out = Command::new("uname").arg("-n").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn boot_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let line = stat.lines().find(|l| l.starts_with("btime ")).unwrap();
    line[6..].trim().parse::<u64>().unwrap() * 1_000_000_000
}

/// Whether ::1 is configured (`/proc/net/if_inet6` lists every IPv6 address).
fn has_ipv6_loopback() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("00000000000000000000000000000001 "))
        })
        .unwrap_or(false)
}

#[test]
fn this_hosts_own_addresses_resolve_to_its_identity() {
    let mut src = HostSource::new(Duration::from_secs(5)).unwrap();
    let expected = Identity {
        kind: IdentityKind::Host,
        name: uname_n(),
        source: "host".into(),
        ..Identity::default()
    };
    assert_eq!(*src.identity(), expected);
    let now = now_ns();
    let changes = src.check(now);
    let (last, opens) = changes.split_last().unwrap();
    assert_eq!(
        *last,
        OwnershipChange::Watermark {
            source: "host".into(),
            at_ns: now
        }
    );
    let boot = boot_ns();
    for open in opens {
        match open {
            OwnershipChange::Open {
                source,
                owner,
                prefix,
                identity,
                at_ns,
            } => {
                assert_eq!(source, "host");
                assert_eq!(*owner, format!("host/{}", expected.name));
                // Single addresses, except loopback networks.
                assert!(
                    prefix.prefix_len() == prefix.max_prefix_len() || prefix.addr().is_loopback(),
                    "{prefix}"
                );
                assert_eq!(**identity, expected);
                assert_eq!(*at_ns, boot, "the first poll's addresses date from boot");
            }
            other => panic!("expected only opens before the watermark: {other:?}"),
        }
    }
    let mut index = IdentityIndex::new();
    changes.into_iter().for_each(|c| index.apply(c));
    let me = Endpoint::exact(Arc::new(expected));
    let v4: IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!(index.lookup(v4, now), me);
    assert_eq!(index.lookup("::ffff:127.0.0.1".parse().unwrap(), now), me);
    assert_eq!(index.lookup(v4, boot - 1), Endpoint::unknown());
    let v6: IpAddr = "::1".parse().unwrap();
    if has_ipv6_loopback() {
        assert_eq!(index.lookup(v6, now), me);
    } else {
        assert_eq!(index.lookup(v6, now), Endpoint::unknown());
    }
    // The loopback network is the host's as a whole, not only 127.0.0.1.
    assert_eq!(index.lookup("127.0.0.53".parse().unwrap(), now), me);
    assert!(src.prefixes().any(|p| p == "127.0.0.0/8".parse().unwrap()));
    assert!(src.prefixes().any(|p| p == "127.0.0.1/32".parse().unwrap()));
    // Nothing changed since: only a watermark.
    let later = now + 1;
    assert_eq!(
        src.check(later),
        vec![OwnershipChange::Watermark {
            source: "host".into(),
            at_ns: later
        }]
    );
}

#[tokio::test]
async fn the_host_source_runs_as_a_task_until_shut_down() {
    let src: Box<dyn InventorySource> = Box::new(HostSource::with_hostname(
        "node-a".into(),
        Duration::from_secs(5),
    ));
    assert_eq!(src.name(), "host");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(src.run(tx, shutdown.clone()));
    let mut opened_loopback = false;
    loop {
        match rx.recv().await.unwrap() {
            OwnershipChange::Open {
                prefix, identity, ..
            } => {
                assert_eq!(identity.name, "node-a");
                opened_loopback |= prefix == "127.0.0.1/32".parse().unwrap();
            }
            OwnershipChange::Watermark { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(opened_loopback);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
