//! The update log's cost per update against the SQLite journal's, as the
//! poller pays it: a `getUpdates` batch stored before its offset is
//! confirmed. Prints figures; asserts nothing.
//!
//!     PATH="$PWD/target/venv/bin:$PATH" cargo bench --bench cluster_log -- [BATCHES]
//!
//! Both store BATCHES (default 50) batches of 100 updates of about 400 bytes
//! each, then again with batches of one update (an idle bot's typical
//! batch):
//! - journal: `Journal::append` with fsync on, in a temp dir;
//! - log: `UpdateLog::publish` to a three-replica stream on a three-node
//!   NATS cluster on loopback (tests/common/nats.rs), the batch's publishes
//!   in flight together, then every acknowledgement awaited.
//!
//! Loopback hides the network round trip a real cluster adds (typically
//! 0.2-1 ms inside a data centre), and all three servers share this
//! machine's disk and cores.

#[path = "../tests/common/nats.rs"]
mod nats;

use std::time::{Duration, Instant};

use asgigramd::cluster::{self, UpdateLog};
use asgigramd::journal::Journal;
use asgigramd::settings::{ClusterSettings, NatsAuth};
use bytes::Bytes;

fn update(id: i64) -> String {
    format!(
        "{{\"update_id\":{id},\"message\":{{\"message_id\":{id},\"date\":1700000000,\
         \"chat\":{{\"id\":{},\"type\":\"private\",\"first_name\":\"Bench\"}},\
         \"from\":{{\"id\":{},\"is_bot\":false,\"first_name\":\"Bench\"}},\
         \"text\":\"{}\"}}}}",
        1000 + id % 50,
        1000 + id % 50,
        "x".repeat(220)
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, batch: usize, mut times: Vec<Duration>) {
    times.sort();
    let total: Duration = times.iter().sum();
    println!(
        "{what:<8} batch={batch:<3} per batch p50={:>8.3} ms p99={:>8.3} ms  per update {:>7.1} us",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e6 / (times.len() * batch) as f64
    );
}

fn main() {
    let batches: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut journal = Journal::open(dir.path(), "bench").expect("journal opens");
    journal.set_fsync(true).expect("fsync on");
    let Some(nats) = nats::NatsCluster::start("cluster_log bench") else {
        eprintln!("cluster_log: no nats-server on PATH; see the header");
        return;
    };
    let runtime = actix_rt::System::new();
    let log = runtime.block_on(async {
        nats.wait_ready().await;
        let settings = ClusterSettings {
            nats_urls: nats.urls(),
            auth: NatsAuth::None,
            ca_file: None,
            node_id: "bench".into(),
            partitions: 16,
            replicas: 3,
            lease_ttl: Duration::from_secs(10),
            lease_renew: Duration::from_secs(3),
            duplicate_window: Duration::from_secs(600),
        };
        let js = cluster::connect(&settings).await.expect("connects");
        UpdateLog::open(&js, 4242, &settings)
            .await
            .expect("log opens")
    });
    let mut next_id = 1i64;
    for batch in [100usize, 1] {
        let mut journal_times = Vec::new();
        let mut log_times = Vec::new();
        for _ in 0..batches {
            let ids: Vec<i64> = (next_id..next_id + batch as i64).collect();
            next_id += batch as i64;
            let texts: Vec<(i64, String)> = ids.iter().map(|&id| (id, update(id))).collect();
            let start = Instant::now();
            journal.append(&texts, None).expect("appended");
            journal_times.push(start.elapsed());
            let start = Instant::now();
            runtime.block_on(async {
                let publishes = texts.iter().map(|(id, text)| {
                    log.publish(*id, (*id % 16) as u32, Bytes::from(text.clone()))
                });
                for result in futures_util::future::join_all(publishes).await {
                    result.expect("stored");
                }
            });
            log_times.push(start.elapsed());
        }
        report("journal", batch, journal_times);
        report("log", batch, log_times);
    }
}
