//! Network namespaces a test builds for itself. libp2p's mDNS is silent on loopback, and it must
//! never run on a real LAN from a test, so the mDNS tests make two namespaces joined by a veth
//! pair (addresses that exist only inside them, a multicast route on the veth), re-execute their
//! own binary inside each one in a child role (`ip netns exec`), and read the children's report
//! lines. The namespaces go when their guard drops, and a child is killed (by its pid) when its
//! handle drops, whatever way the test ends.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

/// Runs `ip ARGS`; the error says which command failed and why.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes the namespaces (and with them the veth pair) when dropped.
pub struct Namespaces(Vec<String>);

impl Namespaces {
    /// Namespaces `names[0]` and `names[1]` joined by a veth pair named `dev` on both sides,
    /// `addrs[i]` (a /24) on namespace i, loopback and the veth up, and a route for multicast
    /// (224.0.0.0/4) through the veth. On an error, what was built so far is removed.
    pub fn veth_pair(names: [&str; 2], dev: &str, addrs: [&str; 2]) -> Result<Namespaces, String> {
        let mut guard = Namespaces(Vec::new());
        for ns in names {
            ip(&["netns", "add", ns])?;
            guard.0.push(ns.to_owned());
        }
        ip(&[
            "-n", names[0], "link", "add", dev, "type", "veth", "peer", "name", dev, "netns",
            names[1],
        ])?;
        for (ns, addr) in names.into_iter().zip(addrs) {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", dev])?;
        }
        Ok(guard)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A child process, killed (by its own pid) if it still runs when dropped.
pub struct Kid(pub Child);

impl Kid {
    pub fn spawn(cmd: &mut Command) -> Result<Kid, String> {
        cmd.spawn()
            .map(Kid)
            .map_err(|e| format!("spawning child: {e}"))
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This test binary run inside namespace `ns`, running only the test `test`, its stdout piped
/// and stdin closed (the caller sets the role's environment, and may pipe stdin). Its stderr is
/// dropped, or kept in `<prefix>-<role>.log` when the variable `log_var` names a prefix (a
/// debugging aid).
pub fn self_in(ns: &str, test: &str, log_var: &str, role: &str) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(match std::env::var_os(log_var) {
            Some(p) => std::fs::File::create(format!("{}-{role}.log", p.to_string_lossy()))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
            None => Stdio::null(),
        });
    Ok(c)
}

/// The runtime of a child role; with `log_var` set, the library's debug logs go to stderr (which
/// [`self_in`] keeps in a file).
pub fn child_runtime(log_var: &str) -> tokio::runtime::Runtime {
    if std::env::var_os(log_var).is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug,netlink_proto=info,multistream_select=info,yamux=info")
            .with_writer(std::io::stderr)
            .try_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A child's report line: `<mark><KEY> <value>` on its stdout.
pub fn say(mark: &str, key: &str, value: impl std::fmt::Display) {
    println!("{mark}{key} {value}");
}

/// The `(key, value)` report lines of a child's stdout, read until it closes.
pub fn report_lines(out: impl Read, mark: &str) -> Vec<(String, String)> {
    BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            // The harness prints `test NAME ... ` without a newline before the test runs, so the
            // marker may sit mid-line.
            let at = l.find(mark)?;
            let (k, v) = l[at + mark.len()..].split_once(' ')?;
            Some((k.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// The values reported under `key`, in order.
pub fn get<'a>(report: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    report
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}
