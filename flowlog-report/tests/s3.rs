//! A report read from an S3-compatible store (moto at `FLOWLOG_TEST_S3`; `scripts/test` starts
//! it): the files of `tests/window.rs`'s connection uploaded under a prefix, with a stray file
//! outside the window, and the endpoint and credentials from the `AWS_*` variables as a user
//! would give them.
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use flowlog_report::{Report, Request};
use object_store::{ObjectStoreExt as _, aws::AmazonS3Builder, path::Path as Key};
use support::*;

/// Every file under `dir`, with its path relative to `dir`.
fn files(dir: &Path, under: &Path, out: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(under).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(dir, &path, out);
        } else {
            let relative = path.strip_prefix(dir).unwrap().display().to_string();
            out.push((path, relative));
        }
    }
}

fn boto3(endpoint: &str, code: &str) {
    let script = format!(
        "import boto3\ns3 = boto3.client('s3', endpoint_url='{endpoint}', \
         aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n{code}"
    );
    let status = Command::new("python3")
        .args(["-c", &script])
        .status()
        .expect("python3 with boto3 (scripts/bootstrap installs it)");
    assert!(status.success(), "{code}");
}

#[test]
fn a_report_reads_the_window_from_s3() {
    let endpoint = std::env::var("FLOWLOG_TEST_S3").unwrap_or_else(|_| {
        panic!(
            "FLOWLOG_TEST_S3 is not set: run `scripts/moto start` and export \
             FLOWLOG_TEST_S3=http://127.0.0.1:5000 (scripts/test does both)"
        )
    });
    // SAFETY: this test binary has this one test, which sets the variables before it starts
    // any thread of its own; nothing else in the process reads or writes the environment.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let bucket = format!("flowlog-report-s3-{}", std::process::id());
    boto3(&endpoint, &format!("s3.create_bucket(Bucket='{bucket}')"));

    let dir = temp_dir("s3");
    connection(&dir);
    std::fs::write(
        partition(&dir, T0 - 30 * 24 * HOUR).join("garbage.parquet"),
        b"not parquet",
    )
    .unwrap();
    let mut local = Vec::new();
    files(&dir, &dir, &mut local);
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .build()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (path, relative) in &local {
        let key = Key::from(format!("flows/{relative}"));
        let bytes = std::fs::read(path).unwrap();
        rt.block_on(store.put(&key, bytes.into())).unwrap();
    }
    drop(rt);

    let window = Request {
        data: format!("s3://{bucket}/flows"),
        ..request(Report::Connections, &dir, T0 + HOUR, T0 + 2 * HOUR)
    };
    let rows = run(&window).unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(
        (&rows[0]["bytes_up"], &rows[0]["bytes_down"]),
        (&1500.into(), &30.into())
    );
    let everything = Request {
        from_ns: 0,
        to_ns: u64::MAX / 2,
        ..window
    };
    let err = run(&everything).unwrap_err().to_string();
    assert!(err.contains("garbage.parquet"), "{err}");

    boto3(
        &endpoint,
        &format!(
            "for o in s3.list_objects_v2(Bucket='{bucket}').get('Contents', []):\n    \
             s3.delete_object(Bucket='{bucket}', Key=o['Key'])\ns3.delete_bucket(Bucket='{bucket}')"
        ),
    );
    let _ = std::fs::remove_dir_all(dir);
}
