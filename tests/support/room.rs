//! Real nodes on loopback for the `node_*` tests: a node with the fast test KDF, the fixture clip
//! as a source, and waiting on a room's status, whichever role holds the room.

use std::future::Future;
use std::time::Duration;

use libp2p::Multiaddr;
use waterfall::{
    FileSource, KdfParams, MediaSource, Node, NodeBuilder, NodeError, RoomStatus, SourceOptions,
};

/// A node builder on loopback (the builder's default) with the fast, insecure test KDF, the
/// test's tracing installed.
pub fn builder() -> NodeBuilder {
    super::init_tracing();
    Node::builder().kdf(KdfParams::TEST_ONLY)
}

/// A node on loopback that bootstraps from `boot` (none: it is the first).
pub async fn node(boot: Vec<Multiaddr>) -> Node {
    builder()
        .bootstrap(boot)
        .spawn()
        .await
        .expect("node starts")
}

/// A fixture file as a media source, played `loops` times more (`None`: once).
pub async fn clip(name: &str, loops: Option<u32>) -> Box<dyn MediaSource> {
    let opts = SourceOptions {
        loops,
        ..SourceOptions::default()
    };
    let src = FileSource::open(super::fixture(name), opts)
        .await
        .expect("fixture opens");
    Box::new(src)
}

/// Polls a room's status until `ok` holds for it, at most `within` (else a panic naming `what`).
/// `status` reads it from either handle: `|| broadcast.status()` or `|| watch.status()`.
pub async fn wait_status<F, Fut>(
    what: &str,
    within: Duration,
    status: F,
    ok: impl Fn(&RoomStatus) -> bool,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<RoomStatus, NodeError>>,
{
    let reached = super::wait_for(within, || async { status().await.is_ok_and(|s| ok(&s)) }).await;
    assert!(reached, "{what}: status not reached within {within:?}");
}
