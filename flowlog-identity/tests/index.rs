//! The index's interval semantics, each asserted with exact endpoints: address reuse, reopening,
//! ambiguity, prefix specificity, IPv4-mapped lookups, watermark gating, pruning, and the odd
//! inputs (duplicate Opens, unmatched and out-of-order Closes) with their counts.
use std::{net::IpAddr, sync::Arc, time::Duration};

use flowlog_identity::{
    ChangeCounts, IdentityIndex, OwnershipChange, Presence, SharedIndex, SourceSet, Timing,
    apply_changes,
};
use flowlog_record::{Attribution, Endpoint, Identity, IdentityKind};
use ipnet::IpNet;

const S: u64 = 1_000_000_000;

fn pod(name: &str) -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::Pod,
        name: name.to_owned(),
        namespace: Some("shop".to_owned()),
        pod_uid: Some(format!("uid-{name}")),
        source: "kubernetes".to_owned(),
        ..Identity::default()
    })
}

fn range(name: &str) -> Arc<Identity> {
    Arc::new(Identity {
        kind: IdentityKind::Static,
        name: name.to_owned(),
        source: "static".to_owned(),
        ..Identity::default()
    })
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn open(
    source: &str,
    owner: &str,
    prefix: &str,
    identity: &Arc<Identity>,
    at_ns: u64,
) -> OwnershipChange {
    OwnershipChange::Open {
        source: source.to_owned(),
        owner: owner.to_owned(),
        prefix: net(prefix),
        identity: Arc::clone(identity),
        at_ns,
    }
}

fn close(source: &str, owner: &str, prefix: &str, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Close {
        source: source.to_owned(),
        owner: owner.to_owned(),
        prefix: net(prefix),
        at_ns,
    }
}

fn uncertain(
    owner: &str,
    prefix: &str,
    identity: &Arc<Identity>,
    from_ns: u64,
    to_ns: u64,
) -> OwnershipChange {
    OwnershipChange::Uncertain {
        source: "kubernetes".to_owned(),
        owner: owner.to_owned(),
        prefix: net(prefix),
        identity: Arc::clone(identity),
        from_ns,
        to_ns,
    }
}

fn watermark(source: &str, at_ns: u64) -> OwnershipChange {
    OwnershipChange::Watermark {
        source: source.to_owned(),
        at_ns,
    }
}

fn index(changes: Vec<OwnershipChange>) -> IdentityIndex {
    let mut index = IdentityIndex::new();
    for c in changes {
        index.apply(c);
    }
    index
}

fn exact(identity: &Arc<Identity>) -> Endpoint {
    Endpoint::exact(Arc::clone(identity))
}

fn ambiguous(names: &[&str]) -> Endpoint {
    Endpoint {
        status: Attribution::Ambiguous,
        identity: None,
        candidates: names.iter().map(|n| (*n).to_owned()).collect(),
    }
}

/// A handover known only to within spans (the old owner's release somewhere in 200–201 s, the
/// new owner's arrival in 200.5–202 s): sure before and after, and in the spans every owner
/// that may have held the address is named — the old one alone where it was it or nobody.
#[test]
fn changes_known_only_to_within_a_span_are_ambiguous_there_and_exact_outside() {
    let (old, new) = (pod("cart-1"), pod("checkout-7"));
    let p = "10.1.2.3/32";
    let changes = vec![
        open("kubernetes", "pod/a", p, &old, 100 * S),
        close("kubernetes", "pod/a", p, 200 * S),
        uncertain("pod/a", p, &old, 200 * S, 201 * S),
        uncertain("pod/b", p, &new, 200 * S + S / 2, 202 * S),
        open("kubernetes", "pod/b", p, &new, 202 * S),
        // Re-sent: held once.
        uncertain("pod/b", p, &new, 200 * S + S / 2, 202 * S),
        // A span of the owner that surely holds the address changes nothing.
        uncertain("pod/b", p, &new, 202 * S, 203 * S),
    ];
    let index = index(changes);
    let a = ip("10.1.2.3");
    assert_eq!(index.lookup(a, 200 * S - 1), exact(&old));
    assert_eq!(index.lookup(a, 200 * S), ambiguous(&["shop/cart-1"]));
    assert_eq!(
        index.lookup(a, 200 * S + S / 2),
        ambiguous(&["shop/cart-1", "shop/checkout-7"])
    );
    assert_eq!(index.lookup(a, 201 * S), ambiguous(&["shop/checkout-7"]));
    assert_eq!(
        index.lookup(a, 202 * S - 1),
        ambiguous(&["shop/checkout-7"])
    );
    assert_eq!(index.lookup(a, 202 * S), exact(&new));
    assert_eq!(index.lookup(a, 202 * S + S / 2), exact(&new));
    assert_eq!(index.intervals(), 5, "two tenures, three distinct spans");
    assert_eq!(index.count_intervals(), 5);
    assert_eq!(index.counts().uncertain, 4);
    let mut index = index;
    assert_eq!(index.prune(201 * S), 2, "the old tenure and its span");
    assert_eq!(index.lookup(a, 201 * S), ambiguous(&["shop/checkout-7"]));
}

/// Both changes of a short tenure fell in one span (its Close dated before its Open): it never
/// surely held, so every lookup in the spans is ambiguous, and outside them unknown.
#[test]
fn a_tenure_shorter_than_its_spans_is_only_ever_a_candidate() {
    let c = pod("batch-3");
    let p = "10.1.2.4/32";
    let index = index(vec![
        uncertain("pod/c", p, &c, 299 * S, 300 * S),
        open("kubernetes", "pod/c", p, &c, 300 * S),
        close("kubernetes", "pod/c", p, 299 * S + S / 2),
        uncertain("pod/c", p, &c, 299 * S + S / 2, 301 * S),
    ]);
    let a = ip("10.1.2.4");
    assert_eq!(index.lookup(a, 299 * S - 1), Endpoint::unknown());
    assert_eq!(index.lookup(a, 299 * S), ambiguous(&["shop/batch-3"]));
    assert_eq!(
        index.lookup(a, 300 * S + S / 2),
        ambiguous(&["shop/batch-3"])
    );
    assert_eq!(index.lookup(a, 301 * S), Endpoint::unknown());
    assert_eq!(index.open_intervals(), 0);
}

#[test]
fn an_address_reused_one_second_after_its_owner_left_attributes_each_flow_to_its_time() {
    let (old, new) = (pod("cart-1"), pod("checkout-7"));
    let index = index(vec![
        open("kubernetes", "pod/uid-cart-1", "10.1.2.3/32", &old, 100 * S),
        close("kubernetes", "pod/uid-cart-1", "10.1.2.3/32", 200 * S),
        open(
            "kubernetes",
            "pod/uid-checkout-7",
            "10.1.2.3/32",
            &new,
            201 * S,
        ),
    ]);
    let a = ip("10.1.2.3");
    assert_eq!(index.lookup(a, 100 * S - 1), Endpoint::unknown());
    assert_eq!(index.lookup(a, 100 * S), exact(&old));
    assert_eq!(index.lookup(a, 200 * S - 1), exact(&old));
    assert_eq!(index.lookup(a, 200 * S), Endpoint::unknown());
    assert_eq!(index.lookup(a, 200 * S + S / 2), Endpoint::unknown());
    assert_eq!(index.lookup(a, 201 * S), exact(&new));
    assert_eq!(index.lookup(a, u64::MAX - 1), exact(&new));
    assert_eq!(index.intervals(), 2);
    assert_eq!(index.prefixes(), 1);
    assert_eq!(index.open_intervals(), 1);
    // The exact hit hands out the index's own identity, not a copy.
    let hit = index.lookup(a, 150 * S).identity.unwrap();
    assert!(Arc::ptr_eq(&hit, &old));
}

#[test]
fn an_owner_that_closes_and_reopens_has_a_gap() {
    let a = pod("api-0");
    let index = index(vec![
        open("kubernetes", "pod/uid-api-0", "10.1.0.9/32", &a, 100 * S),
        close("kubernetes", "pod/uid-api-0", "10.1.0.9/32", 200 * S),
        open("kubernetes", "pod/uid-api-0", "10.1.0.9/32", &a, 300 * S),
    ]);
    let addr = ip("10.1.0.9");
    assert_eq!(index.lookup(addr, 150 * S), exact(&a));
    assert_eq!(index.lookup(addr, 250 * S), Endpoint::unknown());
    assert_eq!(index.lookup(addr, 300 * S), exact(&a));
    assert_eq!(index.lookup(addr, 900 * S), exact(&a));
    assert_eq!(index.intervals(), 2);
    assert_eq!(index.counts().duplicate_opens, 0);
    assert_eq!(index.counts().stale_opens, 0);
}

#[test]
fn overlapping_owners_at_one_prefix_length_are_ambiguous_with_every_candidate() {
    let (a, b, c) = (pod("web-b"), pod("web-a"), range("lab"));
    let index = index(vec![
        open("kubernetes", "pod/uid-web-b", "10.1.0.5/32", &a, 100 * S),
        open("kubernetes", "pod/uid-web-a", "10.1.0.5/32", &b, 150 * S),
        close("kubernetes", "pod/uid-web-a", "10.1.0.5/32", 300 * S),
        open("static", "static/lab", "10.1.0.5/32", &c, 200 * S),
        close("static", "static/lab", "10.1.0.5/32", 250 * S),
    ]);
    let addr = ip("10.1.0.5");
    assert_eq!(index.lookup(addr, 120 * S), exact(&a));
    assert_eq!(
        index.lookup(addr, 150 * S),
        ambiguous(&["shop/web-a", "shop/web-b"])
    );
    assert_eq!(
        index.lookup(addr, 220 * S),
        ambiguous(&["lab", "shop/web-a", "shop/web-b"])
    );
    assert_eq!(
        index.lookup(addr, 260 * S),
        ambiguous(&["shop/web-a", "shop/web-b"])
    );
    assert_eq!(index.lookup(addr, 300 * S), exact(&a));
}

#[test]
fn an_address_nobody_owned_is_unknown() {
    let a = pod("db-0");
    let index = index(vec![open(
        "kubernetes",
        "pod/uid-db-0",
        "10.1.0.7/32",
        &a,
        100 * S,
    )]);
    assert_eq!(index.lookup(ip("10.1.0.8"), 150 * S), Endpoint::unknown());
    assert_eq!(
        index.lookup(ip("2001:db8::7"), 150 * S),
        Endpoint::unknown()
    );
    assert_eq!(
        IdentityIndex::new().lookup(ip("10.1.0.7"), 150 * S),
        Endpoint::unknown()
    );
}

#[test]
fn the_most_specific_prefix_with_an_interval_at_the_time_answers() {
    let (corp, lab, lab2, p) = (range("corp"), range("lab"), range("lab-2"), pod("job-1"));
    let index = index(vec![
        // Host bits in a prefix are cleared.
        open("static", "static/corp", "10.0.77.1/16", &corp, 0),
        open("static", "static/lab", "10.0.1.0/24", &lab, 0),
        open("static", "static/lab-2", "10.0.1.0/24", &lab2, 500 * S),
        open("kubernetes", "pod/uid-job-1", "10.0.1.7/32", &p, 100 * S),
        close("kubernetes", "pod/uid-job-1", "10.0.1.7/32", 200 * S),
    ]);
    assert_eq!(index.prefixes(), 3);
    assert_eq!(index.lookup(ip("10.0.1.7"), 150 * S), exact(&p));
    // Outside the pod's tenure, the /32 has nothing at that time: the /24 answers.
    assert_eq!(index.lookup(ip("10.0.1.7"), 50 * S), exact(&lab));
    assert_eq!(index.lookup(ip("10.0.1.7"), 250 * S), exact(&lab));
    assert_eq!(
        index.lookup(ip("10.0.1.7"), 600 * S),
        ambiguous(&["lab", "lab-2"])
    );
    assert_eq!(index.lookup(ip("10.0.2.1"), 600 * S), exact(&corp));
    assert_eq!(index.lookup(ip("10.1.0.0"), 600 * S), Endpoint::unknown());
}

#[test]
fn ipv6_and_ipv4_mapped_addresses() {
    let (v4, v6net, v6pod, mapped) = (pod("a"), range("v6-net"), pod("v6"), range("mapped"));
    let index = index(vec![
        open("kubernetes", "pod/uid-a", "10.0.1.7/32", &v4, 100 * S),
        open("static", "static/v6-net", "2001:db8::/64", &v6net, 0),
        open(
            "kubernetes",
            "pod/uid-v6",
            "2001:db8::5/128",
            &v6pod,
            100 * S,
        ),
        // An IPv4-mapped prefix is an IPv4 prefix (192.0.2.0/24).
        open(
            "static",
            "static/mapped",
            "::ffff:192.0.2.0/120",
            &mapped,
            0,
        ),
    ]);
    assert_eq!(index.lookup(ip("::ffff:10.0.1.7"), 150 * S), exact(&v4));
    assert_eq!(index.lookup(ip("192.0.2.9"), 150 * S), exact(&mapped));
    assert_eq!(
        index.lookup(ip("::ffff:192.0.2.9"), 150 * S),
        exact(&mapped)
    );
    assert_eq!(index.lookup(ip("2001:db8::5"), 150 * S), exact(&v6pod));
    assert_eq!(index.lookup(ip("2001:db8::5"), 50 * S), exact(&v6net));
    assert_eq!(index.lookup(ip("2001:db8::6"), 150 * S), exact(&v6net));
    assert_eq!(
        index.lookup(ip("2001:db8:1::5"), 150 * S),
        Endpoint::unknown()
    );
    // ::10.0.1.7 (IPv4-compatible, not mapped) is an IPv6 address.
    assert_eq!(index.lookup(ip("::10.0.1.7"), 150 * S), Endpoint::unknown());
}

#[test]
fn watermarks_of_registered_sources_gate_caught_up_to() {
    let mut index = IdentityIndex::new();
    assert_eq!(
        index.caught_up_to(),
        Some(u64::MAX),
        "no source: nothing to wait for"
    );
    index.register_source("static");
    index.register_source("kubernetes");
    assert_eq!(index.caught_up_to(), None);
    assert!(!index.is_caught_up(0));
    index.apply(watermark("static", 100 * S));
    assert_eq!(
        index.caught_up_to(),
        None,
        "kubernetes has said nothing yet"
    );
    index.apply(watermark("kubernetes", 50 * S));
    assert_eq!(index.caught_up_to(), Some(50 * S));
    assert!(index.is_caught_up(50 * S));
    assert!(!index.is_caught_up(50 * S + 1));
    index.apply(watermark("kubernetes", 200 * S));
    assert_eq!(index.caught_up_to(), Some(100 * S));
    index.apply(watermark("static", 90 * S));
    assert_eq!(
        index.caught_up_to(),
        Some(100 * S),
        "watermarks never go back"
    );
    index.apply(watermark("ec2", 10 * S));
    assert_eq!(
        index.caught_up_to(),
        Some(100 * S),
        "unregistered sources do not gate"
    );
    assert_eq!(index.watermark_of("ec2"), Some(10 * S));
    index.apply(watermark("static", 300 * S));
    assert_eq!(index.caught_up_to(), Some(200 * S));
    let counts = index.counts();
    assert_eq!(counts.watermarks, 6);
    assert_eq!(counts.watermark_regressions, 1);
    assert_eq!(counts.unregistered_watermarks, 1);
}

/// The clock-skew window `[t - skew, t + skew]` (both ends included) across a handover: exact
/// only where one owner held the address for the whole window, both owners named where the
/// window crosses the change, each boundary to the nanosecond.
#[test]
fn a_skew_window_across_a_change_of_owner_names_both_owners() {
    let (old, new) = (pod("cart-1"), pod("checkout-7"));
    let index = index(vec![
        open("kubernetes", "pod/uid-cart-1", "10.1.2.3/32", &old, 100 * S),
        close("kubernetes", "pod/uid-cart-1", "10.1.2.3/32", 200 * S),
        open(
            "kubernetes",
            "pod/uid-checkout-7",
            "10.1.2.3/32",
            &new,
            200 * S,
        ),
    ]);
    let (a, skew) = (ip("10.1.2.3"), S);
    let both = ambiguous(&["shop/cart-1", "shop/checkout-7"]);
    // The last start whose window ends before the change (at 200 s - 1 ns).
    assert_eq!(index.lookup_around(a, 199 * S - 1, skew), exact(&old));
    // Its window reaches 200 s exactly, the new owner's first nanosecond.
    assert_eq!(index.lookup_around(a, 199 * S, skew), both);
    assert_eq!(index.lookup_around(a, 200 * S, skew), both);
    assert_eq!(index.lookup_around(a, 201 * S - 1, skew), both);
    // The first start whose window begins at the change.
    assert_eq!(index.lookup_around(a, 201 * S, skew), exact(&new));
    // Far from the change, the window changes nothing.
    assert_eq!(index.lookup_around(a, 150 * S, skew), exact(&old));
    assert_eq!(index.lookup_around(a, u64::MAX - 1, skew), exact(&new));
    // The first owner's start: a window reaching before it reaches a time of nobody.
    assert_eq!(
        index.lookup_around(a, 101 * S - 1, skew),
        Endpoint::unknown()
    );
    assert_eq!(index.lookup_around(a, 101 * S, skew), exact(&old));
    // Skew 0 is the point lookup, boundaries included.
    for t in [100 * S - 1, 100 * S, 200 * S - 1, 200 * S, 250 * S] {
        assert_eq!(index.lookup_around(a, t, 0), index.lookup(a, t), "at {t}");
    }
    // A window that starts before the epoch is cut at 0, and nobody owned the address then.
    assert_eq!(index.lookup_around(a, S / 2, skew), Endpoint::unknown());
}

/// A skew window over a span known only as a candidate's is ambiguous, even with that one
/// candidate, as a point lookup in the span is; the sure owner's own span changes nothing.
#[test]
fn a_skew_window_reaching_an_uncertain_span_is_ambiguous() {
    let (old, new) = (pod("cart-1"), pod("checkout-7"));
    let p = "10.1.2.3/32";
    let index = index(vec![
        open("kubernetes", "pod/a", p, &old, 100 * S),
        close("kubernetes", "pod/a", p, 200 * S),
        uncertain("pod/a", p, &old, 200 * S, 201 * S),
        uncertain("pod/b", p, &new, 201 * S, 202 * S),
        open("kubernetes", "pod/b", p, &new, 202 * S),
        uncertain("pod/b", p, &new, 202 * S, 203 * S),
    ]);
    let (a, skew) = (ip("10.1.2.3"), S / 2);
    // Sure of the old owner throughout, up to its last nanosecond.
    assert_eq!(
        index.lookup_around(a, 200 * S - S / 2 - 1, skew),
        exact(&old)
    );
    // The window reaches the old owner's span: one candidate, but not sure.
    assert_eq!(
        index.lookup_around(a, 200 * S - S / 2, skew),
        ambiguous(&["shop/cart-1"])
    );
    assert_eq!(
        index.lookup_around(a, 201 * S, skew),
        ambiguous(&["shop/cart-1", "shop/checkout-7"])
    );
    // Past every span of nobody-sure, the new owner is exact, its own later span included.
    assert_eq!(index.lookup_around(a, 202 * S + S / 2, skew), exact(&new));
    for t in [199 * S, 200 * S, 201 * S, 202 * S] {
        assert_eq!(index.lookup_around(a, t, 0), index.lookup(a, t), "at {t}");
    }
}

/// A flow that proves its address was held (its peer answered) rules nobody out: where the
/// only candidate is an owner known to within a span ("it or nobody"), that owner is exact; where
/// two owners may have held it, both are still named; where no owner could have, it is still
/// unknown. Point lookups and skew windows alike.
#[test]
fn a_held_address_makes_the_one_candidate_of_a_span_exact() {
    let (old, new) = (pod("cart-1"), pod("checkout-7"));
    let p = "10.1.2.3/32";
    let index = index(vec![
        open("kubernetes", "pod/a", p, &old, 100 * S),
        close("kubernetes", "pod/a", p, 200 * S),
        uncertain("pod/a", p, &old, 200 * S, 201 * S),
        uncertain("pod/b", p, &new, 200 * S + S / 2, 202 * S),
        open("kubernetes", "pod/b", p, &new, 202 * S),
        close("kubernetes", "pod/b", p, 300 * S),
    ]);
    let a = ip("10.1.2.3");
    let held = |t, skew| index.lookup_with(a, t, skew, Presence::Held).endpoint;
    let unproven = |t, skew| index.lookup_with(a, t, skew, Presence::Unproven).endpoint;
    // Which answers the proof decided.
    let by_presence = |t, skew| index.lookup_with(a, t, skew, Presence::Held).by_presence;
    // "cart-1 or nobody" → cart-1; "checkout-7 or nobody" → checkout-7.
    assert_eq!(unproven(200 * S, 0), ambiguous(&["shop/cart-1"]));
    assert_eq!(held(200 * S, 0), exact(&old));
    assert_eq!(unproven(201 * S, 0), ambiguous(&["shop/checkout-7"]));
    assert_eq!(held(201 * S, 0), exact(&new));
    // Both spans: two candidates whatever the flow proves.
    let both = ambiguous(&["shop/cart-1", "shop/checkout-7"]);
    assert_eq!(held(200 * S + S / 2, 0), both);
    // Sure answers do not change; nobody's time with no candidate stays unknown.
    assert_eq!(held(150 * S, 0), exact(&old));
    assert_eq!(held(250 * S, 0), exact(&new));
    assert_eq!(held(300 * S, 0), Endpoint::unknown());
    assert_eq!(held(50 * S, 0), Endpoint::unknown());
    // A window that meets one owner and times of nobody: unknown unproven, the owner if held.
    assert_eq!(unproven(300 * S, S / 2), Endpoint::unknown());
    assert_eq!(held(300 * S, S / 2), exact(&new));
    assert_eq!(unproven(100 * S, S / 2), Endpoint::unknown());
    assert_eq!(held(100 * S, S / 2), exact(&old));
    // A window across the handover still names both.
    assert_eq!(held(201 * S, 2 * S), both);
    // The proof decided exactly the answers it changed.
    assert!(by_presence(200 * S, 0) && by_presence(201 * S, 0));
    assert!(by_presence(300 * S, S / 2) && by_presence(100 * S, S / 2));
    assert!(!by_presence(150 * S, 0) && !by_presence(250 * S, 0));
    assert!(!by_presence(200 * S + S / 2, 0) && !by_presence(201 * S, 2 * S));
    assert!(!by_presence(300 * S, 0));
    // With nothing proven, lookup_with is lookup_around.
    for t in [150 * S, 200 * S, 201 * S, 300 * S] {
        assert_eq!(
            unproven(t, S / 2),
            index.lookup_around(a, t, S / 2),
            "at {t}"
        );
        assert_eq!(unproven(t, 0), index.lookup(a, t), "at {t}");
    }
}

/// A window that reaches a time when nobody held the address is `unknown` (nobody is one of
/// the answers), even though an owner held it for the rest of the window.
#[test]
fn a_skew_window_reaching_a_gap_with_no_owner_is_unknown() {
    let (old, new) = (pod("cart-1"), pod("checkout-7"));
    let index = index(vec![
        open("kubernetes", "pod/uid-cart-1", "10.1.2.3/32", &old, 100 * S),
        close("kubernetes", "pod/uid-cart-1", "10.1.2.3/32", 200 * S),
        open(
            "kubernetes",
            "pod/uid-checkout-7",
            "10.1.2.3/32",
            &new,
            203 * S,
        ),
    ]);
    let (a, skew) = (ip("10.1.2.3"), S);
    assert_eq!(index.lookup_around(a, 199 * S - 1, skew), exact(&old));
    assert_eq!(index.lookup_around(a, 199 * S, skew), Endpoint::unknown());
    assert_eq!(index.lookup_around(a, 201 * S, skew), Endpoint::unknown());
    // The window spans the whole gap: both owners and nobody: still unknown.
    assert_eq!(index.lookup_around(a, 201 * S, 3 * S), Endpoint::unknown());
    assert_eq!(
        index.lookup_around(a, 204 * S - 1, skew),
        Endpoint::unknown()
    );
    assert_eq!(index.lookup_around(a, 204 * S, skew), exact(&new));
}

/// Inside the window each time is answered at the most specific prefix with an interval then:
/// a pod's /32 that starts inside the window of a flow to a static /16 makes it the pod or the
/// range, and both are named.
#[test]
fn a_skew_window_falls_through_to_a_less_specific_prefix_where_the_specific_one_has_nobody() {
    let (corp, p) = (range("corp"), pod("job-1"));
    let index = index(vec![
        open("static", "static/corp", "10.0.0.0/16", &corp, 0),
        open("kubernetes", "pod/uid-job-1", "10.0.1.7/32", &p, 100 * S),
        close("kubernetes", "pod/uid-job-1", "10.0.1.7/32", 200 * S),
    ]);
    let (a, skew) = (ip("10.0.1.7"), S);
    assert_eq!(index.lookup_around(a, 99 * S - 1, skew), exact(&corp));
    assert_eq!(
        index.lookup_around(a, 99 * S, skew),
        ambiguous(&["corp", "shop/job-1"])
    );
    assert_eq!(index.lookup_around(a, 150 * S, skew), exact(&p));
    assert_eq!(
        index.lookup_around(a, 200 * S, skew),
        ambiguous(&["corp", "shop/job-1"])
    );
    assert_eq!(index.lookup_around(a, 201 * S, skew), exact(&corp));
    // Another address of the range never sees the pod.
    assert_eq!(
        index.lookup_around(ip("10.0.1.8"), 150 * S, skew),
        exact(&corp)
    );
}

fn polled(period_s: u64) -> Timing {
    Timing::Polled {
        period: Duration::from_secs(period_s),
    }
}

/// Which sources a flow must wait for: a continuous source behind the flow's time for every
/// address; a polled one only for addresses it held after its watermark or for times from its
/// next poll's start on; a source ahead of the time for none.
#[test]
fn a_polled_source_is_unsettled_only_where_it_holds_the_address_or_from_its_next_poll() {
    let (vm, other, lan) = (range("vm-a"), range("vm-b"), range("lan"));
    let mut index = IdentityIndex::new();
    index.register_source("kubernetes");
    index.register_source_with("ec2", polled(30));
    index.register_source("static");
    let numbers: Vec<(usize, String)> = index
        .registered_sources()
        .map(|(n, name, _, _)| (n, name.to_owned()))
        .collect();
    let number = |name: &str| numbers.iter().find(|(_, n)| n == name).unwrap().0;
    let (k8s, ec2, st) = (number("kubernetes"), number("ec2"), number("static"));
    let set = |ns: &[usize]| {
        let mut s = SourceSet::EMPTY;
        ns.iter().for_each(|n| s.insert(*n));
        s
    };
    assert_eq!(index.source_name(ec2), Some("ec2"));
    assert_eq!(index.source_timing(ec2), Some(polled(30)));
    assert_eq!(index.source_timing(k8s), Some(Timing::Continuous));
    let (held, free, gone) = (ip("10.0.0.1"), ip("192.168.1.1"), ip("10.0.0.9"));
    // Nothing reported yet: every source gates every address.
    assert_eq!(index.unsettled(free, 0), set(&[k8s, ec2, st]));
    for change in [
        open("ec2", "eni/a", "10.0.0.1/32", &vm, 10 * S),
        open("ec2", "eni/b", "10.0.0.9/32", &other, 10 * S),
        close("ec2", "eni/b", "10.0.0.9/32", 90 * S),
        open("static", "static/lan", "192.168.0.0/16", &lan, 0),
        watermark("ec2", 100 * S),
        watermark("static", 1_000 * S),
        watermark("kubernetes", 1_000 * S),
    ] {
        index.apply(change);
    }
    assert_eq!(index.caught_up_to(), Some(100 * S));
    assert!(
        index.unsettled(held, 100 * S).is_empty(),
        "at the watermark"
    );
    // Past EC2's watermark: only the address EC2 holds waits for it...
    assert_eq!(index.unsettled(held, 100 * S + 1), set(&[ec2]));
    assert!(index.unsettled(free, 100 * S + 1).is_empty());
    // ...not one it released before its watermark...
    assert!(index.unsettled(gone, 129 * S).is_empty());
    // ...until the flow is as new as EC2's next poll (watermark + period).
    assert!(index.unsettled(free, 130 * S - 1).is_empty());
    assert_eq!(index.unsettled(free, 130 * S), set(&[ec2]));
    // A close after the watermark (a poll's changes applied, its watermark not yet) is still a
    // prefix EC2 held after its watermark: its handover may be on the way.
    index.apply(close("ec2", "eni/a", "10.0.0.1/32", 110 * S));
    assert_eq!(index.unsettled(held, 105 * S), set(&[ec2]));
    // The continuous sources gate every address past their watermarks.
    assert_eq!(index.unsettled(free, 1_000 * S + 1), set(&[k8s, ec2, st]));
    index.apply(watermark("ec2", 130 * S));
    assert!(index.unsettled(held, 130 * S).is_empty());
    assert!(
        index.unsettled(held, 131 * S).is_empty(),
        "released before 130 s"
    );
    // An unregistered source never gates.
    index.apply(open("other", "x", "172.16.0.1/32", &vm, 0));
    index.apply(watermark("other", 0));
    assert!(index.unsettled(ip("172.16.0.1"), 131 * S).is_empty());
}

#[test]
fn prune_forgets_intervals_that_ended_before_the_time() {
    let (a, b, c, d, e) = (pod("a"), pod("b"), pod("c"), pod("d"), pod("e"));
    let mut index = index(vec![
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 100 * S),
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 200 * S),
        open("kubernetes", "pod/uid-b", "10.0.0.1/32", &b, 201 * S),
        close("kubernetes", "pod/uid-b", "10.0.0.1/32", 300 * S),
        open("kubernetes", "pod/uid-c", "10.0.0.1/32", &c, 301 * S),
        open("kubernetes", "pod/uid-d", "2001:db8::d/128", &d, 10 * S),
        close("kubernetes", "pod/uid-d", "2001:db8::d/128", 50 * S),
        // A close that never matched, older than the prune time.
        close("kubernetes", "pod/uid-gone", "10.0.0.9/32", 60 * S),
    ]);
    assert_eq!(index.intervals(), 4);
    assert_eq!(index.pending_closes(), 1);
    assert_eq!(index.prune(200 * S), 2);
    assert_eq!(index.intervals(), 2);
    assert_eq!(index.count_intervals(), 2);
    assert_eq!(index.prefixes(), 1);
    assert_eq!(index.pending_closes(), 0);
    assert_eq!(index.lookup(ip("10.0.0.1"), 150 * S), Endpoint::unknown());
    assert_eq!(index.lookup(ip("10.0.0.1"), 250 * S), exact(&b));
    assert_eq!(index.lookup(ip("10.0.0.1"), 400 * S), exact(&c));
    assert_eq!(index.lookup(ip("2001:db8::d"), 20 * S), Endpoint::unknown());
    assert_eq!(index.prune(200 * S), 0);
    // The surviving intervals still close correctly.
    index.apply(close("kubernetes", "pod/uid-c", "10.0.0.1/32", 500 * S));
    assert_eq!(index.lookup(ip("10.0.0.1"), 500 * S), Endpoint::unknown());
    index.apply(open("kubernetes", "pod/uid-e", "10.0.0.2/32", &e, 600 * S));
    // Open intervals are never pruned, whatever the time.
    assert_eq!(index.prune(u64::MAX), 2);
    assert_eq!(index.intervals(), 1);
    assert_eq!(index.prefixes(), 1);
    assert_eq!(index.lookup(ip("10.0.0.2"), u64::MAX - 1), exact(&e));
}

#[test]
fn a_duplicate_open_adds_no_interval_and_the_close_ends_the_one_there_is() {
    let a = pod("a");
    let mut index = index(vec![
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 100 * S),
        // A re-list re-sends it: same tenure.
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &pod("a"), 100 * S),
        // Re-sent with an earlier start: the earlier start stands.
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 90 * S),
    ]);
    assert_eq!(index.intervals(), 1);
    assert_eq!(index.counts().duplicate_opens, 2);
    assert_eq!(index.lookup(ip("10.0.0.1"), 95 * S), exact(&a));
    index.apply(close("kubernetes", "pod/uid-a", "10.0.0.1/32", 200 * S));
    assert_eq!(index.lookup(ip("10.0.0.1"), 199 * S), exact(&a));
    assert_eq!(index.lookup(ip("10.0.0.1"), 200 * S), Endpoint::unknown());
    assert_eq!(index.open_intervals(), 0);
}

#[test]
fn a_duplicate_open_with_a_new_identity_splits_the_tenure_at_its_time() {
    let old = pod("a");
    let relabelled = Arc::new(Identity {
        labels: [("version".to_owned(), "2".to_owned())].into(),
        ..(*old).clone()
    });
    let index = index(vec![
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &old, 100 * S),
        open(
            "kubernetes",
            "pod/uid-a",
            "10.0.0.1/32",
            &relabelled,
            150 * S,
        ),
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 200 * S),
    ]);
    assert_eq!(index.intervals(), 2);
    assert_eq!(index.lookup(ip("10.0.0.1"), 149 * S), exact(&old));
    assert_eq!(index.lookup(ip("10.0.0.1"), 150 * S), exact(&relabelled));
    assert_eq!(index.lookup(ip("10.0.0.1"), 200 * S), Endpoint::unknown());
    assert_eq!(index.counts().duplicate_opens, 1);
}

#[test]
fn an_unmatched_close_is_counted_and_opens_nothing() {
    let index = index(vec![close(
        "kubernetes",
        "pod/uid-x",
        "10.0.0.1/32",
        200 * S,
    )]);
    assert_eq!(index.intervals(), 0);
    assert_eq!(index.prefixes(), 0);
    assert_eq!(index.pending_closes(), 1);
    assert_eq!(index.lookup(ip("10.0.0.1"), 100 * S), Endpoint::unknown());
    assert_eq!(
        index.counts(),
        ChangeCounts {
            closes: 1,
            unmatched_closes: 1,
            ..ChangeCounts::default()
        }
    );
}

#[test]
fn a_close_that_overtook_its_open_is_not_lost() {
    let a = pod("a");
    let index = index(vec![
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 200 * S),
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 100 * S),
    ]);
    assert_eq!(index.lookup(ip("10.0.0.1"), 150 * S), exact(&a));
    assert_eq!(index.lookup(ip("10.0.0.1"), 200 * S), Endpoint::unknown());
    assert_eq!(index.intervals(), 1);
    assert_eq!(index.open_intervals(), 0);
    assert_eq!(index.pending_closes(), 0);
    let counts = index.counts();
    assert_eq!((counts.unmatched_closes, counts.late_opens), (1, 1));
}

#[test]
fn a_pending_close_older_than_a_new_open_does_not_end_it() {
    let a = pod("a");
    let index = index(vec![
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 50 * S),
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 100 * S),
    ]);
    assert_eq!(index.lookup(ip("10.0.0.1"), 1_000 * S), exact(&a));
    assert_eq!(index.open_intervals(), 1);
    assert_eq!(index.counts().late_opens, 0);
}

#[test]
fn a_close_before_its_open_drops_the_interval() {
    let a = pod("a");
    let index = index(vec![
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 200 * S),
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 100 * S),
    ]);
    assert_eq!(index.intervals(), 0);
    assert_eq!(index.prefixes(), 0);
    assert_eq!(index.lookup(ip("10.0.0.1"), 300 * S), Endpoint::unknown());
    assert_eq!(index.counts().inverted_closes, 1);
}

#[test]
fn an_open_and_close_resent_after_the_tenure_ended_add_nothing() {
    let a = pod("a");
    let index = index(vec![
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 100 * S),
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 200 * S),
        // A stale replay of the same history.
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 100 * S),
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 200 * S),
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 100 * S),
    ]);
    assert_eq!(index.intervals(), 1);
    assert_eq!(index.lookup(ip("10.0.0.1"), 150 * S), exact(&a));
    assert_eq!(index.lookup(ip("10.0.0.1"), 250 * S), Endpoint::unknown());
    let counts = index.counts();
    assert_eq!(counts.stale_opens, 2);
    assert_eq!(counts.stale_closes, 1);
    assert_eq!(counts.unmatched_closes, 0);
    assert_eq!(index.pending_closes(), 0);
}

#[test]
fn a_close_replayed_from_an_earlier_tenure_does_not_end_the_current_one() {
    let a = pod("a");
    let index = index(vec![
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 100 * S),
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 200 * S),
        open("kubernetes", "pod/uid-a", "10.0.0.1/32", &a, 300 * S),
        close("kubernetes", "pod/uid-a", "10.0.0.1/32", 200 * S),
    ]);
    assert_eq!(index.intervals(), 2);
    assert_eq!(index.open_intervals(), 1);
    assert_eq!(index.lookup(ip("10.0.0.1"), 150 * S), exact(&a));
    assert_eq!(index.lookup(ip("10.0.0.1"), 250 * S), Endpoint::unknown());
    assert_eq!(index.lookup(ip("10.0.0.1"), 400 * S), exact(&a));
    let counts = index.counts();
    assert_eq!((counts.stale_closes, counts.inverted_closes), (1, 0));
}

#[test]
fn changes_round_trip_through_json() {
    let changes = vec![
        open("static", "static/lab", "10.0.1.0/24", &range("lab"), 5),
        close("static", "static/lab", "2001:db8::/64", 6),
        watermark("static", 7),
    ];
    for change in changes {
        let json = serde_json::to_string(&change).unwrap();
        let back: OwnershipChange = serde_json::from_str(&json).unwrap();
        assert_eq!(back, change);
    }
    assert_eq!(
        serde_json::to_string(&watermark("host", 7)).unwrap(),
        r#"{"type":"watermark","source":"host","at_ns":7}"#
    );
    assert_eq!(
        serde_json::to_string(&close("static", "static/lab", "10.0.1.0/24", 6)).unwrap(),
        r#"{"type":"close","source":"static","owner":"static/lab","prefix":"10.0.1.0/24","at_ns":6}"#
    );
}

#[tokio::test]
async fn apply_changes_drains_the_channel_into_the_shared_index() {
    let shared: SharedIndex = Arc::default();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(apply_changes(Arc::clone(&shared), rx));
    let a = pod("a");
    for n in 0..10u64 {
        let prefix = format!("10.0.0.{n}/32");
        tx.send(open("kubernetes", "pod/uid-a", &prefix, &a, n * S))
            .await
            .unwrap();
    }
    tx.send(watermark("kubernetes", 10 * S)).await.unwrap();
    drop(tx);
    task.await.unwrap();
    let index = shared.read();
    assert_eq!(index.intervals(), 10);
    assert_eq!(index.lookup(ip("10.0.0.9"), 9 * S), exact(&a));
    assert_eq!(index.lookup(ip("10.0.0.9"), 9 * S - 1), Endpoint::unknown());
    assert_eq!(index.watermark_of("kubernetes"), Some(10 * S));
}

/// The index against a brute-force reading of the same intervals, on a deterministic random
/// history: many owners per address, overlaps, closes out of insertion order, three prefix
/// lengths, prunes. Checks the binary search and the `reach` cut-off of the backward scan, and
/// the clock-skew windows ([`IdentityIndex::lookup_around`]) against the point answers of every
/// time in each window, one in `window_step` times.
fn brute_force_model(ops: usize, seed: u64, window_step: usize) -> [usize; 3] {
    let mut state = seed;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let prefixes = [
        "10.0.0.0/16",
        "10.0.1.0/24",
        "10.0.1.1/32",
        "10.0.1.2/32",
        "10.0.2.3/32",
    ];
    let owners: Vec<Arc<Identity>> = (0..12).map(|i| pod(&format!("p{i}"))).collect();
    // (prefix, owner, from, to) as the model holds them.
    let mut model: Vec<(IpNet, usize, u64, u64)> = Vec::new();
    let mut open_now: Vec<(usize, usize, usize)> = Vec::new(); // (prefix, owner, model row)
    let mut index = IdentityIndex::new();
    for _ in 0..ops {
        let t = next(5_000);
        let p = next(prefixes.len() as u64) as usize;
        let o = next(owners.len() as u64) as usize;
        let owner = format!("pod/{o}");
        match open_now.iter().position(|&(op, oo, _)| op == p && oo == o) {
            Some(i) => {
                let (_, _, row) = open_now.swap_remove(i);
                let from = model[row].2;
                let to = from + 1 + next(300);
                model[row].3 = to;
                index.apply(close("kubernetes", &owner, prefixes[p], to));
            }
            // A tenure starting exactly when an earlier one of the same owner did is a replay,
            // which the index ignores by design: keep the model to distinct starts.
            None if model
                .iter()
                .any(|r| r.0 == net(prefixes[p]) && r.1 == o && r.2 == t) => {}
            None => {
                open_now.push((p, o, model.len()));
                model.push((net(prefixes[p]), o, t, u64::MAX));
                index.apply(open("kubernetes", &owner, prefixes[p], &owners[o], t));
            }
        }
    }
    let brute = |model: &[(IpNet, usize, u64, u64)], addr: IpAddr, t: u64| -> Endpoint {
        for len in [32u8, 24, 16] {
            let mut found: Vec<usize> = model
                .iter()
                .filter(|(n, _, from, to)| {
                    n.prefix_len() == len && n.contains(&addr) && *from <= t && t < *to
                })
                .map(|r| r.1)
                .collect();
            found.sort();
            found.dedup();
            match found.len() {
                0 => continue,
                1 => return exact(&owners[found[0]]),
                _ => {
                    let ids: Vec<Arc<Identity>> =
                        found.iter().map(|&i| Arc::clone(&owners[i])).collect();
                    return Endpoint::ambiguous(&ids);
                }
            }
        }
        Endpoint::unknown()
    };
    let addrs = [
        "10.0.1.1", "10.0.1.2", "10.0.2.3", "10.0.1.9", "10.0.3.3", "10.1.0.0",
    ]
    .map(ip);
    // The window's answer read off the point answers of each of its times: unknown if any
    // time has nobody, else every owner any time has.
    let brute_window = |model: &[(IpNet, usize, u64, u64)], addr: IpAddr, t: u64, skew: u64| {
        let (lo, hi) = (t.saturating_sub(skew), t + skew);
        let model: Vec<_> = model
            .iter()
            .filter(|(n, _, from, to)| n.contains(&addr) && *from <= hi && lo < *to)
            .copied()
            .collect();
        let mut names: Vec<String> = Vec::new();
        for at in lo..=hi {
            let point = brute(&model, addr, at);
            match point.status {
                Attribution::Unknown => return Endpoint::unknown(),
                Attribution::Exact => names.push(point.identity.unwrap().display_name()),
                Attribution::Ambiguous => names.extend(point.candidates),
            }
        }
        names.sort();
        names.dedup();
        match names.as_slice() {
            [one] => exact(
                &owners[owners
                    .iter()
                    .position(|o| o.display_name() == *one)
                    .unwrap()],
            ),
            _ => Endpoint {
                status: Attribution::Ambiguous,
                identity: None,
                candidates: names,
            },
        }
    };
    let mut seen = [0usize; 3];
    let mut check = |index: &IdentityIndex, model: &[(IpNet, usize, u64, u64)], from: u64| {
        for t in (from..5_400).step_by(5) {
            for a in addrs {
                let found = index.lookup(a, t);
                assert_eq!(found, brute(model, a, t), "{a} at {t}");
                seen[found.status as usize] += 1;
            }
        }
        for t in (from + 40..5_400).step_by(window_step) {
            for a in addrs {
                for skew in [1, 7, 40] {
                    let found = index.lookup_around(a, t, skew);
                    assert_eq!(
                        found,
                        brute_window(model, a, t, skew),
                        "{a} at {t} ± {skew}"
                    );
                }
            }
        }
    };
    assert_eq!(index.intervals(), model.len());
    check(&index, &model, 0);
    let before = model.len();
    let pruned = index.prune(2_000);
    model.retain(|r| r.3 == u64::MAX || r.3 > 2_000);
    assert_eq!(index.intervals(), model.len());
    assert_eq!(index.count_intervals(), model.len());
    assert_eq!(pruned, before - model.len());
    check(&index, &model, 2_000);
    seen
}

#[test]
fn lookups_agree_with_a_brute_force_model_of_long_histories() {
    // Slots of dozens of intervals (binary search), heavy overlap.
    let seen = brute_force_model(600, 0x9e37_79b9_7f4a_7c15, 23);
    assert!(
        seen.iter().all(|n| *n > 0),
        "every outcome exercised: {seen:?}"
    );
}

#[test]
fn lookups_agree_with_a_brute_force_model_of_short_histories() {
    // Slots of a few intervals (scanned from the end), over many seeds.
    let mut seen = [0usize; 3];
    for seed in 1..=60u64 {
        let s = brute_force_model(25, seed.wrapping_mul(0x2545_f491_4f6c_dd1d), 307);
        (0..3).for_each(|i| seen[i] += s[i]);
    }
    assert!(
        seen.iter().all(|n| *n > 0),
        "every outcome exercised: {seen:?}"
    );
}
