//! What the CLI writes on stderr: messages, a one-line status that redraws itself, and logs.
//!
//! The status line is drawn with `\r` and no newline, so anything else written to stderr would
//! land in the middle of it. Every other writer — [`say!`], and the tracing subscriber through
//! [`Stderr`] — first ends an open status line. On a terminal the status redraws in place; when
//! stderr is a file or a pipe, `\r` would pile everything into one endless line, so the status
//! is written as an ordinary line, at most every [`PLAIN_STATUS_EVERY`].
//!
//! Logs: by default only our own warnings (in words a user can act on) and other crates'
//! errors are shown, without timestamps or module paths; libp2p's routine warnings (a Kademlia
//! bootstrap with no known peers, gossipsub penalties of peers that left a mesh) describe normal
//! operation of a small network, not a problem the user has. `RUST_LOG` overrides the filter and
//! brings back the full format.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the status is written when stderr is not a terminal.
const PLAIN_STATUS_EVERY: Duration = Duration::from_secs(10);

/// The default log filter: our warnings, everyone else's errors only, except two webrtc-rs
/// modules whose errors are routine: the TURN relayer logs every refused allocation (our ICE
/// notices say it in words), and the peer connection driver logs each RTP packet that arrives
/// before its track is set up or after it closed (normal at the start and end of a call).
pub const DEFAULT_FILTER: &str = "error,waterfall=warn,\
    webrtc::peer_connection::transport::turn_relayer=off,webrtc::peer_connection::driver=off";

/// Whether a status line is on screen without its newline.
static STATUS_OPEN: AtomicBool = AtomicBool::new(false);
/// When the status was last written as a plain line (stderr not a terminal).
static LAST_PLAIN: Mutex<Option<Instant>> = Mutex::new(None);

/// Ends an open status line, so that the next write starts on a line of its own.
pub fn end_status() {
    if STATUS_OPEN.swap(false, Ordering::SeqCst) {
        let _ = writeln!(std::io::stderr().lock());
    }
}

/// Draws the status line (in place on a terminal; now and then as a plain line otherwise).
pub fn status(line: &str) {
    let err = std::io::stderr();
    if err.is_terminal() {
        let mut e = err.lock();
        let _ = write!(e, "\r\x1b[K{line}");
        let _ = e.flush();
        STATUS_OPEN.store(true, Ordering::SeqCst);
        return;
    }
    let mut last = LAST_PLAIN.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|t| t.elapsed() >= PLAIN_STATUS_EVERY) {
        *last = Some(Instant::now());
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

/// A line on stderr that first ends an open status line. Unlike `eprintln!` it never panics: a
/// closed stderr loses the line, not the node (which may be relaying to others).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::term::end_status();
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use say;

/// A line on stdout (tickets, `--json` events). Unlike `println!` it never panics when the
/// reader has gone (`waterfall watch --json | head -1`): the line is lost, the node goes on.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
pub(crate) use out;

/// stderr for the tracing subscriber: each event starts on a line of its own.
pub struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = std::io::Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        end_status();
        std::io::stderr()
    }
}

/// Installs the log subscriber: [`DEFAULT_FILTER`] in a short format, or `RUST_LOG` in full.
pub fn init_tracing() {
    let ansi = std::io::stderr().is_terminal();
    match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(Stderr)
            .with_ansi(ansi)
            .init(),
        Err(_) => tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(DEFAULT_FILTER))
            .with_writer(Stderr)
            .with_ansi(ansi)
            .without_time()
            .with_target(false)
            .init(),
    }
}
