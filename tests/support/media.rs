//! The media layer alone (no swarm): a broadcaster and viewers linked by hand, offer to answer,
//! and the log of each one's events with the time each arrived.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use waterfall::MediaEvent;
use waterfall::media::{Broadcaster, Viewer};

/// Every event of one media session, with the time it arrived.
pub type Log = Arc<Mutex<Vec<(Instant, MediaEvent)>>>;

/// Keeps every event `rx` delivers in a [`Log`] (a task reads it until the session ends).
pub fn collect(mut rx: mpsc::Receiver<MediaEvent>) -> Log {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            l.lock().unwrap().push((Instant::now(), ev));
        }
    });
    log
}

/// When the first event matching `pred` arrived; panics naming `what` after 20 s without one.
pub async fn wait_event(log: &Log, what: &str, pred: impl Fn(&MediaEvent) -> bool) -> Instant {
    let mut at = None;
    super::wait_for(Duration::from_secs(20), || {
        at = log
            .lock()
            .unwrap()
            .iter()
            .find(|(_, e)| pred(e))
            .map(|(t, _)| *t);
        std::future::ready(at.is_some())
    })
    .await;
    at.unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

/// Who a viewer attaches to.
pub enum Parent<'a> {
    B(&'a Broadcaster),
    V(&'a Viewer),
}

/// Attaches `child` (whose events go to `log`) below `parent` and waits for its media
/// connection.
pub async fn link(parent: Parent<'_>, child: &Viewer, log: &Log) {
    let offer = child.connect_parent().await.unwrap();
    let (_, answer) = match parent {
        Parent::B(b) => b.attach_child(&offer).await.unwrap(),
        Parent::V(v) => v.attach_child(&offer).await.unwrap(),
    };
    child.parent_answer(&answer).await.unwrap();
    wait_event(log, "parent connected", |e| {
        matches!(e, MediaEvent::ParentConnected)
    })
    .await;
}
