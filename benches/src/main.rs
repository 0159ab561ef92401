//! Placeholder: the churn benchmark harness lands here.
fn main() {}
