//! Runs the tree simulator at scale and prints the report (and the wall time).
//!
//! `cargo run --release --example sim_scale -- [NODES] [DURATION_SECS] [CHURN_MEAN_SECS] [SEED] [--json]`
//! Defaults: 10000 nodes, 1800 s, 600 s mean session, seed 1. Environment overrides: JOIN_RATE,
//! CRASH_FRACTION, FIXED=1 (every viewer has fanout slots), REBALANCE_MS, REPAIR_TIMEOUT_MS.

use std::time::Instant;

use waterfall::proto::sim::{SimConfig, run};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let nums: Vec<f64> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let cfg = SimConfig {
        nodes: nums.first().map_or(10_000, |n| *n as usize),
        duration_secs: nums.get(1).copied().unwrap_or(1800.0),
        churn_mean_secs: Some(nums.get(2).copied().unwrap_or(600.0)).filter(|m| *m > 0.0),
        seed: nums.get(3).map_or(1, |s| *s as u64),
        ..SimConfig::default()
    };
    let mut cfg = cfg;
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    if let Some(v) = env("JOIN_RATE") {
        cfg.join_rate_per_sec = v;
    }
    if let Some(v) = env("CRASH_FRACTION") {
        cfg.crash_fraction = v;
    }
    if let Some(v) = env("REBALANCE_MS") {
        cfg.tree = cfg.tree.rebalance_interval_ms(v as u64);
    }
    if let Some(v) = env("REPAIR_TIMEOUT_MS") {
        cfg.tree = cfg.tree.repair_timeout_ms(v as u64);
    }
    if env("FIXED").is_some_and(|v| v > 0.0) {
        cfg.capacity = waterfall::proto::sim::CapacityDist::Fixed;
    }
    let t0 = Instant::now();
    let report = run(&cfg);
    let wall = t0.elapsed();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        println!("{report}");
    }
    eprintln!("wall time: {:.2} s", wall.as_secs_f64());
}
