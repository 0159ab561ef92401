//! A topic of the benchmark's own on the broker (unique name, deleted on drop), so that each
//! condition starts from an empty topic and nothing of another run or test is counted.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
};

pub struct Topic {
    pub name: String,
    brokers: String,
    runtime: tokio::runtime::Runtime,
}

fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .with_context(|| format!("creating a Kafka admin client for {brokers}"))
}

impl Topic {
    /// Creates `flowlog-bench-<tag>-<pid>-<ns>` with `partitions` partitions and waits until the
    /// broker's metadata shows all of them.
    pub fn create(brokers: &str, tag: &str, partitions: i32) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let name = format!("flowlog-bench-{tag}-{}-{nanos}", std::process::id());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let client = admin(brokers)?;
        // A broker busy with other clients' work may time out a creation: asked again.
        let mut attempt = 0;
        let results = loop {
            attempt += 1;
            match runtime.block_on(client.create_topics(
                &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
                &options,
            )) {
                Ok(results) => break results,
                Err(e) if attempt < 3 => {
                    eprintln!("creating topic {name} on {brokers}: {e}; trying again");
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "creating topic {name} on {brokers} (is it running? `scripts/kafka start`)"
                        )
                    });
                }
            }
        };
        for r in results {
            r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client
                .inner()
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .is_ok_and(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == name
                            && t.error().is_none()
                            && t.partitions().len() == partitions as usize
                    })
                });
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("topic {name} did not appear in {brokers}'s metadata");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            name,
            brokers: brokers.to_string(),
            runtime,
        })
    }
}

impl Drop for Topic {
    fn drop(&mut self) {
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        if let Ok(client) = admin(&self.brokers) {
            let _ = self
                .runtime
                .block_on(client.delete_topics(&[&self.name], &options));
        }
    }
}
