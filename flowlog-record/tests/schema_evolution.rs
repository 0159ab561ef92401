//! The evolution policy of `schemas/` (schemas/README.md), checked with apache-avro's
//! schema-compatibility checker: each `flow_record.v<N>.avsc` and `enriched_flow.v<N>.avsc`
//! reads data written by v<N-1> and v<N-1> reads data written by v<N>; fields are only added
//! (with defaults) and enum symbols only appended. Derived bad schemas, built here and never written to `schemas/`, prove the check
//! fails where it must.
use std::path::{Path, PathBuf};

use apache_avro::{
    Schema,
    schema::RecordSchema,
    schema_compatibility::{Compatibility, SchemaCompatibility},
};
use serde_json::{Value, json};

const SCHEMAS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas");

/// The record types in `schemas/`: file stem and record name.
const RECORDS: [(&str, &str); 2] = [
    ("flow_record", "FlowRecord"),
    ("enriched_flow", "EnrichedFlow"),
];

/// Every `<stem>.v<N>.avsc` in `schemas/`, by version.
fn versions_of(stem: &str) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(SCHEMAS_DIR).expect("read schemas/") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix(&format!("{stem}.v"))
            .and_then(|rest| rest.strip_suffix(".avsc"))
        {
            let n: u32 = n
                .parse()
                .unwrap_or_else(|_| panic!("{name}: the version is not a number"));
            found.push((n, path));
        }
    }
    found.sort();
    found
}

/// Every `flow_record.v<N>.avsc` in `schemas/`, by version.
fn versions() -> Vec<(u32, PathBuf)> {
    versions_of("flow_record")
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse(json: &Value) -> Result<Schema, String> {
    Schema::parse(json).map_err(|e| format!("does not parse: {e}"))
}

/// Checks that `next` is an allowed successor of `prev`: both read each other's data fully, and
/// `next` keeps every field of `prev` with the same name in the same place and every enum symbol
/// in the same place (the checker alone would let a field with a default be dropped, or an enum
/// symbol be removed behind a reader's default).
fn check_evolution(prev: &Value, next: &Value) -> Result<(), String> {
    let (p, n) = (parse(prev)?, parse(next)?);
    for (writer, reader, what) in [(&p, &n, "new reads old"), (&n, &p, "old reads new")] {
        match SchemaCompatibility::can_read(writer, reader) {
            Ok(Compatibility::Full) => {}
            Ok(Compatibility::Partial) => return Err(format!("{what}: only partially")),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
    let (
        Schema::Record(RecordSchema { fields: pf, .. }),
        Schema::Record(RecordSchema { fields: nf, .. }),
    ) = (&p, &n)
    else {
        return Err("not records".into());
    };
    if nf.len() < pf.len() {
        return Err("fields were removed".into());
    }
    for (a, b) in pf.iter().zip(nf) {
        if a.name != b.name {
            return Err(format!("field {} became {}", a.name, b.name));
        }
        let kept = match (&a.schema, &b.schema) {
            (Schema::Enum(ea), Schema::Enum(eb)) => {
                ea.name == eb.name && eb.symbols.starts_with(&ea.symbols)
            }
            // The checker accepts Avro's promotions (int → long, bytes ↔ string…) as compatible;
            // the policy allows no retyping at all.
            (sa, sb) => sa.canonical_form() == sb.canonical_form(),
        };
        if !kept {
            return Err(format!("field {} retyped", a.name));
        }
    }
    for b in &nf[pf.len()..] {
        if b.default.is_none() {
            return Err(format!("new field {} has no default", b.name));
        }
    }
    Ok(())
}

fn v1() -> Value {
    let all = versions();
    assert_eq!(all[0].0, 1, "schemas/flow_record.v1.avsc is missing");
    load(&all[0].1)
}

fn fields(schema: &mut Value) -> &mut Vec<Value> {
    schema["fields"].as_array_mut().unwrap()
}

fn field<'a>(schema: &'a mut Value, name: &str) -> &'a mut Value {
    fields(schema)
        .iter_mut()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no field {name}"))
}

#[test]
fn every_version_reads_its_neighbours() {
    for (stem, record) in RECORDS {
        let all = versions_of(stem);
        assert!(!all.is_empty(), "no schemas/{stem}.v*.avsc");
        for (i, (n, path)) in all.iter().enumerate() {
            assert_eq!(
                *n,
                i as u32 + 1,
                "{stem}: versions must be 1, 2, 3… without gaps"
            );
            let schema = load(path);
            parse(&schema).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(schema["name"], record);
            assert_eq!(schema["namespace"], "flowlog");
        }
        for pair in all.windows(2) {
            let (prev, next) = (&pair[0], &pair[1]);
            if let Err(e) = check_evolution(&load(&prev.1), &load(&next.1)) {
                panic!("{stem} v{} → v{}: {e}", prev.0, next.0);
            }
        }
    }
}

/// Every enum declared anywhere in `schema` (nested records included), as `(name, definition)`.
fn enums(schema: &Value, out: &mut Vec<(String, Value)>) {
    match schema {
        Value::Object(map) => {
            if map.get("type") == Some(&json!("enum")) {
                out.push((map["name"].as_str().unwrap().to_owned(), schema.clone()));
            }
            map.values().for_each(|v| enums(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| enums(v, out)),
        _ => {}
    }
}

/// Every enum declares a default from v1 on, so a v1 reader maps a symbol added later to it
/// instead of failing.
#[test]
fn every_enum_has_a_default() {
    for (stem, _) in RECORDS {
        for (n, path) in versions_of(stem) {
            let mut found = Vec::new();
            enums(&load(&path), &mut found);
            assert!(!found.is_empty(), "{stem} v{n}: no enums found");
            for (name, e) in found {
                assert!(
                    e["symbols"].as_array().unwrap().contains(&e["default"]),
                    "{stem} v{n}: enum {name} has no default symbol"
                );
            }
        }
    }
}

/// What the policy allows: a new nullable field with a default, and a symbol appended to an enum.
#[test]
fn an_allowed_next_version_passes() {
    let v1 = v1();
    let mut v2 = v1.clone();
    fields(&mut v2).push(json!({
        "name": "established_ns", "type": ["null", "long"], "default": null,
        "doc": "when the handshake completed"
    }));
    field(&mut v2, "outcome")["type"]["symbols"]
        .as_array_mut()
        .unwrap()
        .push(json!("timed_out"));
    check_evolution(&v1, &v2).unwrap();
}

#[test]
fn removing_a_field_fails() {
    let v1 = v1();
    let mut bad = v1.clone();
    fields(&mut bad).retain(|f| f["name"] != "host");
    let e = check_evolution(&v1, &bad).unwrap_err();
    assert!(e.contains("old reads new"), "{e}");
    // Even a field with a default may not go (the checker allows it; the policy does not).
    let mut bad = v1.clone();
    fields(&mut bad).retain(|f| f["name"] != "cgroup_id");
    check_evolution(&v1, &bad).unwrap_err();
}

#[test]
fn retyping_a_field_fails() {
    let v1 = v1();
    for (name, new_type) in [
        ("bytes_sent", json!("string")),
        // int → long is a promotion for new readers, but old readers cannot read a long.
        ("seq", json!("long")),
        ("pid", json!(["null", "string"])),
    ] {
        let mut bad = v1.clone();
        field(&mut bad, name)["type"] = new_type;
        let e = check_evolution(&v1, &bad).expect_err(name);
        assert!(e.contains("reads"), "{name}: {e}");
    }
    // bytes ↔ string is a promotion both ways in Avro, so the checker accepts it; the policy
    // check refuses it (an address's bytes are not UTF-8 text).
    let mut bad = v1.clone();
    field(&mut bad, "local_addr")["type"] = json!("string");
    let (p, n) = (parse(&v1).unwrap(), parse(&bad).unwrap());
    assert_eq!(
        SchemaCompatibility::mutual_read(&p, &n),
        Ok(Compatibility::Full)
    );
    let e = check_evolution(&v1, &bad).unwrap_err();
    assert_eq!(e, "field local_addr retyped");
}

#[test]
fn adding_a_field_without_default_fails() {
    let v1 = v1();
    let mut bad = v1.clone();
    fields(&mut bad).push(json!({"name": "established_ns", "type": "long"}));
    let e = check_evolution(&v1, &bad).unwrap_err();
    assert!(e.contains("new reads old"), "{e}");
}

#[test]
fn renaming_a_field_fails() {
    let v1 = v1();
    let mut bad = v1.clone();
    field(&mut bad, "retransmits")["name"] = json!("retrans");
    check_evolution(&v1, &bad).unwrap_err();
}

#[test]
fn removing_or_reordering_enum_symbols_fails() {
    let v1 = v1();
    let mut bad = v1.clone();
    field(&mut bad, "outcome")["type"]["symbols"] = json!(["closed", "failed", "open", "unknown"]);
    check_evolution(&v1, &bad).unwrap_err();
    let mut bad = v1.clone();
    field(&mut bad, "direction")["type"]["symbols"] = json!(["inbound", "outbound", "unknown"]);
    check_evolution(&v1, &bad).unwrap_err();
}

/// Why v1's enums declare a default: without one, a reader that does not know a symbol added
/// later can only partially read the newer data (it fails on records that carry the symbol).
#[test]
fn without_enum_default_old_readers_fail_on_new_symbols() {
    let mut old = v1();
    field(&mut old, "outcome")["type"]
        .as_object_mut()
        .unwrap()
        .remove("default");
    let mut new = old.clone();
    field(&mut new, "outcome")["type"]["symbols"]
        .as_array_mut()
        .unwrap()
        .push(json!("timed_out"));
    let e = check_evolution(&old, &new).unwrap_err();
    assert!(e.contains("old reads new: only partially"), "{e}");
}
