//! The orchestrator (one child process per way and N), the simulator runs, and the outputs:
//! `benchmarks/results.json`, `benchmarks/compare.svg` and `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use waterfall::proto::sim::{SimConfig, run};

use super::{AllResults, RunResult};

/// Where and when the figures were taken.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub nproc: usize,
    pub mem_gib: f64,
    pub kernel: String,
    pub rustc: String,
    pub date_utc: String,
    pub git_commit: String,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_owned(),
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_gib: meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        rustc: sh("rustc", &["--version"]),
        date_utc: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        git_commit: sh(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        ),
    }
}

/// The simulator at `n` viewers, with its default configuration otherwise.
pub fn sim(n: usize) -> serde_json::Value {
    let cfg = SimConfig {
        nodes: n,
        ..SimConfig::default()
    };
    let t0 = Instant::now();
    let report = run(&cfg);
    let wall = t0.elapsed().as_secs_f64();
    let m = machine();
    serde_json::json!({
        "nodes": n,
        "wall_s": wall,
        "git_commit": m.git_commit,
        "date_utc": m.date_utc,
        "summary": report.to_string(),
        "report": report,
    })
}

/// Runs this executable with `args` in a fresh process (in a private network namespace when
/// possible); returns the JSON after `RESULT `.
fn child(args: &[String], netns: bool, limit: Duration) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let mut cmd = if netns {
        let mut c = Command::new("unshare");
        c.args(["-n", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
            .arg(&exe)
            .args(args)
            .env("COMPARE_NETNS", "1");
        c
    } else {
        let mut c = Command::new(&exe);
        c.args(args);
        c
    };
    let mut ch = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut out = ch.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = ch.try_wait()? {
            break Some(st);
        }
        if Instant::now() > deadline {
            // Our own child, by pid.
            let _ = ch.kill();
            let _ = ch.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = reader.join().unwrap_or_default();
    let Some(st) = status else {
        anyhow::bail!("timed out after {} s", limit.as_secs());
    };
    text.lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(str::to_owned)
        .with_context(|| format!("no result ({st})"))
}

/// `compare all ...`: every way at every N, churn, the simulator; then the outputs.
pub fn orchestrate(args: &[String], dir: &Path) -> anyhow::Result<()> {
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let ns: Vec<usize> = opt("--ns")
        .unwrap_or_else(|| "10,25,50,100".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let secs: u64 = opt("--secs").and_then(|s| s.parse().ok()).unwrap_or(20);
    let churn_n: usize = opt("--churn-n").and_then(|s| s.parse().ok()).unwrap_or(50);
    let churn_secs: u64 = opt("--churn-secs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let ways: Vec<String> = opt("--ways")
        .unwrap_or_else(|| "star,tree,gossip-default,gossip-small".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let no_sim = args.iter().any(|a| a == "--no-sim");
    let netns = Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    std::fs::create_dir_all(dir)?;
    let mut all = AllResults {
        machine: machine(),
        command: format!(
            "cargo run --release --example compare -- all {}",
            args.join(" ")
        )
        .trim()
        .to_owned(),
        ..Default::default()
    };
    let t0 = Instant::now();
    for way in &ways {
        for &n in &ns {
            eprintln!("[{:>5.0} s] {way} N={n} ...", t0.elapsed().as_secs_f64());
            let limit = Duration::from_secs(secs + 60 + 3 * n as u64);
            let a = vec!["one".into(), way.clone(), n.to_string(), secs.to_string()];
            match child(&a, netns, limit).and_then(|j| Ok(serde_json::from_str::<RunResult>(&j)?)) {
                Ok(r) => {
                    eprintln!(
                        "    delivery {:.4}  p50 deepest {:.1} ms  upload {:.0} kbit/s  dup {:.3}",
                        r.delivery_ratio,
                        r.latency_deepest_ms.p50,
                        r.source_upload_kbps,
                        r.dup_ratio
                    );
                    all.runs.push(r);
                }
                Err(e) => {
                    eprintln!("    failed: {e:#}");
                    all.failures.push(format!("{way} N={n}: {e:#}"));
                    break;
                }
            }
            // Write as we go: a later failure keeps the figures so far.
            std::fs::write(
                dir.join("results.json"),
                serde_json::to_string_pretty(&all)?,
            )?;
        }
    }
    if churn_n > 0 {
        eprintln!(
            "[{:>5.0} s] churn N={churn_n} ...",
            t0.elapsed().as_secs_f64()
        );
        let a = vec![
            "one".into(),
            "churn".into(),
            churn_n.to_string(),
            churn_secs.to_string(),
        ];
        let limit = Duration::from_secs(churn_secs + 120 + 3 * churn_n as u64);
        match child(&a, netns, limit).and_then(|j| Ok(serde_json::from_str(&j)?)) {
            Ok(c) => all.churn = Some(c),
            Err(e) => all.failures.push(format!("churn N={churn_n}: {e:#}")),
        }
    }
    if !no_sim {
        for n in [1000usize, 10_000] {
            eprintln!("[{:>5.0} s] sim {n} ...", t0.elapsed().as_secs_f64());
            match child(
                &["sim".into(), n.to_string()],
                false,
                Duration::from_secs(600),
            )
            .and_then(|j| Ok(serde_json::from_str(&j)?))
            {
                Ok(v) => all.sim.push(v),
                Err(e) => all.failures.push(format!("sim {n}: {e:#}")),
            }
        }
    }
    eprintln!("[{:>5.0} s] done", t0.elapsed().as_secs_f64());
    write_all(&all, dir)
}

const WAYS: [(&str, RGBColor); 4] = [
    ("tree", RGBColor(0, 114, 178)),
    ("star", RGBColor(213, 94, 0)),
    ("gossip-default", RGBColor(0, 158, 115)),
    ("gossip-small", RGBColor(204, 121, 167)),
];

fn series(all: &AllResults, way: &str, f: impl Fn(&RunResult) -> f64) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = all
        .runs
        .iter()
        .filter(|r| r.way == way)
        .map(|r| (r.n as f64, f(r)))
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    all: &AllResults,
    title: &str,
    y_label: &str,
    f: impl Fn(&RunResult) -> f64 + Copy,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let xmax = all.runs.iter().map(|r| r.n).max().unwrap_or(10) as f64 * 1.05;
    let ymax = all.runs.iter().map(f).fold(0.0f64, f64::max).max(1e-3) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("N (viewers)")
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (way, color) in WAYS {
        let s = series(all, way, f);
        if s.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(s.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(way)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn plot(all: &AllResults, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (l, r) = root.split_horizontally(600);
    panel(&l, all, "p50 latency at the deepest viewer", "ms", |r| {
        r.latency_deepest_ms.p50
    })?;
    panel(&r, all, "source upload", "kbit/s", |r| r.source_upload_kbps)?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn find<'a>(all: &'a AllResults, way: &str, n: usize) -> Option<&'a RunResult> {
    all.runs.iter().find(|r| r.way == way && r.n == n)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**not met**" }
}

/// Writes `results.json`, `compare.svg` and `BENCHMARKS.md` (next to `benchmarks/`).
pub fn write_all(all: &AllResults, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(all)?)?;
    plot(all, &dir.join("compare.svg"))?;
    let m = &all.machine;
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "# Benchmarks: relay tree vs gossipsub vs star\n")?;
    writeln!(
        w,
        "Generated by `examples/compare.rs`; do not edit by hand. Regenerate everything (about 15 minutes):\n\n```sh\ncargo run --release --example compare -- all\n```\n\n(`cargo run --release --example compare -- report` rewrites this page from `benchmarks/results.json`.)\n"
    )?;
    writeln!(
        w,
        "Taken on **{}** at commit `{}` with `{}`.\n",
        m.date_utc, m.git_commit, all.command
    )?;
    writeln!(
        w,
        "Machine: {} x {} (`nproc` = {}), {:.1} GiB RAM, Linux {}, {}. The machine is shared (other builds and tests may have run at the same time), so CPU-bound figures are noisy.\n",
        m.nproc, m.cpu_model, m.nproc, m.mem_gib, m.kernel, m.rustc
    )?;
    writeln!(
        w,
        "![latency and source upload against N](benchmarks/compare.svg)\n"
    )?;
    writeln!(w, "## Method\n")?;
    writeln!(
        w,
        "* **Work**: the source emits 30 messages/s of 1,200 bytes (~288 kbit/s of payload). Each message starts with its sequence number and its send time on a process-wide monotonic clock; every receiver timestamps arrival itself. All nodes of one run live in one process on loopback.\n\
         * **tree**: the waterfall node (libp2p swarm, DHT room record, gossip tree updates, WebRTC relay): one broadcaster (`max_children` 4) and N viewer nodes joining with a ticket, fanout 4, default tree tunables. The messages ride the data channel (E2EE, +40 bytes) through the relay hub. A viewer's data sink is a named pipe read by a stamping thread.\n\
         * **star**: the media layer alone: one `Broadcaster` with all N `Viewer`s attached as direct children (WebRTC from the source to everyone), same data channel, same sinks.\n\
         * **gossip-default / gossip-small**: one rust-libp2p 0.57 gossipsub swarm per node over TCP + noise + yamux, strict signing. Node *i* dials 6 random earlier nodes (the source is node 0). *default* = `gossipsub::Config::default()` (D = 6, 5..12, D_lazy 6, flood publishing on); *small* = D = 3 (2..4), D_lazy 3, outbound min 1, flood publishing off.\n\
         * **Timeline**: the stream runs from the start; viewers join in batches of 4 (gossip: one after the other), then 2 s settle (gossip: 5 s, for the mesh heartbeats), then a measurement window, then 3 s for stragglers. Latency, delivery and duplicates count only messages sent in the window.\n\
         * **Latency at the deepest viewer**: tree = the viewers at the maximum depth at the end; star = every viewer (all at depth 1); gossip = the viewer with the highest median.\n\
         * **Duplicates**: copies received beyond the first, per useful byte. Gossipsub drops duplicates before the application sees them, so its copies are counted in the message-id function, which gossipsub calls once per received copy before the duplicate check.\n\
         * **Source upload**: tree and star = data-channel payload bytes (1,240 B per copy) sent to the source's direct children (counted at the children); gossip = bytes written to the source's TCP sockets (counted by a wrapper under noise), so gossip's figure includes framing and control traffic while the WebRTC figures exclude SCTP/DTLS/UDP headers (~60-90 B per message).\n\
         * **Wire bytes**: every byte on `lo` during the window (IP level, control traffic included), measured in a private network namespace per run (`unshare -n`; flag `netns` in the JSON); wire/useful = that over the payload bytes delivered.\n\
         * **CPU and memory per node**: each (way, N) runs in a fresh child process; CPU = process user+system seconds during the window / (N+1); memory = the process's peak RSS (VmHWM, whole run) / (N+1).\n\
         * **Time to first message**: from the start of a viewer's join (node start, DHT lookup, signalling, ICE/DTLS/SCTP) to its first message.\n"
    )?;
    writeln!(w, "## Results\n")?;
    writeln!(
        w,
        "| way | N | delivery | p50 / p99 deepest (ms) | p50 / p99 all (ms) | depth max | dup/useful | source upload (kbit/s) | wire/useful | CPU s/node (window) | peak MiB/node | first msg p50 / p99 (ms) |"
    )?;
    writeln!(w, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for (way, _) in WAYS {
        let mut rs: Vec<&RunResult> = all.runs.iter().filter(|r| r.way == way).collect();
        rs.sort_by_key(|r| r.n);
        for r in rs {
            writeln!(
                w,
                "| {} | {} | {:.4} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {:.3} | {:.0} | {:.2} | {:.3} | {:.1} | {:.0} / {:.0} |",
                r.way,
                r.n,
                r.delivery_ratio,
                r.latency_deepest_ms.p50,
                r.latency_deepest_ms.p99,
                r.latency_all_ms.p50,
                r.latency_all_ms.p99,
                r.deepest_depth.map_or("-".into(), |d| d.to_string()),
                r.dup_ratio,
                r.source_upload_kbps,
                r.wire_per_useful,
                r.cpu_s_per_node,
                r.peak_rss_mb_per_node,
                r.ttff_ms.p50,
                r.ttff_ms.p99,
            )?;
        }
    }
    writeln!(w)?;
    if !all.failures.is_empty() {
        writeln!(
            w,
            "Runs that did not finish (larger N of that way were skipped):\n"
        )?;
        for f in &all.failures {
            writeln!(w, "* {f}")?;
        }
        writeln!(w)?;
    }
    let notes: Vec<String> = all
        .runs
        .iter()
        .flat_map(|r| {
            r.notes
                .iter()
                .map(move |n| format!("{} N={}: {n}", r.way, r.n))
        })
        .collect();
    if !notes.is_empty() {
        writeln!(w, "<details><summary>Run notes</summary>\n")?;
        for n in notes {
            writeln!(w, "* {n}")?;
        }
        writeln!(w, "\n</details>\n")?;
    }
    writeln!(w, "## The tree under churn\n")?;
    match &all.churn {
        Some(c) => {
            writeln!(
                w,
                "N = {} viewers, {} s; every {} s, 10 % of the relays (viewers with children, rounded up) are killed: {} rounds, {} killed ({:?} of {:?} relays). Kill method: {}.\n",
                c.n,
                c.secs,
                c.kill_interval_s,
                c.rounds,
                c.killed,
                c.killed_per_round,
                c.relays_per_round,
                c.kill_method
            )?;
            writeln!(w, "| figure | value |\n|---|---|")?;
            writeln!(w, "| survivors | {} |", c.survivors)?;
            writeln!(
                w,
                "| survivors that saw a gap > {:.0} ms | {} |",
                c.gap_threshold_ms, c.viewers_with_outage
            )?;
            writeln!(
                w,
                "| outage (arrival gap minus source stalls) p50 / p95 / max | {:.0} / {:.0} / {:.0} ms ({} gaps) |",
                c.outage_gap_ms.p50,
                c.outage_gap_ms.p95,
                c.outage_gap_ms.max,
                c.outage_gap_ms.count
            )?;
            writeln!(
                w,
                "| outage reported by the tree (Rejoined) p50 / p95 | {:.0} / {:.0} ms ({} events) |",
                c.rejoin_outage_ms.p50, c.rejoin_outage_ms.p95, c.rejoin_outage_ms.count
            )?;
            writeln!(
                w,
                "| source stalls > 100 ms (subtracted from the gaps) p50 / max | {:.0} / {:.0} ms ({} stalls) |",
                c.source_stall_ms.p50, c.source_stall_ms.max, c.source_stall_ms.count
            )?;
            writeln!(w, "| delivery at survivors | {:.4} |", c.delivery_ratio)?;
            writeln!(w, "| duplicates per useful byte | {:.4} |", c.dup_ratio)?;
            writeln!(
                w,
                "| latency p50 / p99 (all survivors) | {:.1} / {:.1} ms |\n",
                c.latency_all_ms.p50, c.latency_all_ms.p99
            )?;
            if !c.notes.is_empty() {
                writeln!(w, "Notes: {}\n", c.notes.join("; "))?;
            }
        }
        None => writeln!(w, "Not run.\n")?,
    }
    writeln!(w, "## The simulator at scale\n")?;
    writeln!(
        w,
        "`waterfall::proto::sim::run(&SimConfig {{ nodes, ..SimConfig::default() }})`: the same tree state machines in virtual time (fanout 4, heterogeneous capacities, 50 ms mean link latency, churn with 600 s mean sessions, 20 % crashes, 600 s simulated).\n"
    )?;
    for v in &all.sim {
        writeln!(
            w,
            "N = {} (wall time {:.1} s; commit `{}`, {}):\n\n```text\n{}\n```\n",
            v["nodes"],
            v["wall_s"].as_f64().unwrap_or(0.0),
            v["git_commit"].as_str().unwrap_or(&all.machine.git_commit),
            v["date_utc"].as_str().unwrap_or(&all.machine.date_utc),
            v["summary"].as_str().unwrap_or("").trim_end()
        )?;
    }
    if all.sim.is_empty() {
        writeln!(w, "Not run.\n")?;
    }
    writeln!(w, "## Reading of the targets (N = 50)\n")?;
    let (t, st, gd, gs) = (
        find(all, "tree", 50),
        find(all, "star", 50),
        find(all, "gossip-default", 50),
        find(all, "gossip-small", 50),
    );
    match (t, st) {
        (Some(t), Some(st)) => {
            let ratio = t.source_upload_kbps / st.source_upload_kbps.max(1e-9);
            writeln!(
                w,
                "* Tree source upload <= 1/10 of the star's: {:.0} vs {:.0} kbit/s, ratio {:.3}: {}.",
                t.source_upload_kbps,
                st.source_upload_kbps,
                ratio,
                verdict(ratio <= 0.1)
            )?;
            let g = [gd, gs]
                .iter()
                .flatten()
                .map(|g| format!("{} {:.2}", g.way, g.dup_ratio))
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(
                w,
                "* Tree duplicate ratio <= 0.05 while gossipsub's is a multiple of the payload: tree {:.4} ({}); gossipsub: {}.",
                t.dup_ratio,
                verdict(t.dup_ratio <= 0.05),
                if g.is_empty() {
                    "not measured".into()
                } else {
                    g
                }
            )?;
            let lr = t.latency_deepest_ms.p50 / st.latency_deepest_ms.p50.max(1e-9);
            writeln!(
                w,
                "* Tree p50 latency at the deepest viewer (depth {}) within 2x of the star's: {:.1} vs {:.1} ms, ratio {:.2}: {}.",
                t.deepest_depth.unwrap_or(0),
                t.latency_deepest_ms.p50,
                st.latency_deepest_ms.p50,
                lr,
                verdict(lr <= 2.0)
            )?;
            writeln!(
                w,
                "* Tree delivery >= 99.9 % without churn: {:.4}: {}.",
                t.delivery_ratio,
                verdict(t.delivery_ratio >= 0.999)
            )?;
        }
        _ => writeln!(
            w,
            "* N = 50 was not measured for both the tree and the star."
        )?,
    }
    writeln!(w)?;
    let readme = dir.parent().unwrap_or(dir).join("BENCHMARKS.md");
    let mut md = s;
    if let Ok(extra) = std::fs::read_to_string(dir.join("reading.md")) {
        md.push_str(&extra);
    }
    std::fs::write(readme, md)?;
    Ok(())
}
