//! The rooms of one node ([`Rooms`]): routes what the swarm delivers to the right room task.
//!
//! Requests name their room in clear (its locator, [`RoomId`]); gossip arrives on the room's
//! topic; a closed connection concerns every room. Each room task has a bounded input queue: when
//! it is full, gossip is dropped and a request is refused as busy, so a flood of input never
//! blocks the dispatcher or grows a queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::checks::{Refusal, decode_request, refusal};
use super::task::Input;
use crate::net::ResponseHandle;
use crate::wire::RoomId;

/// How long shutting the node down waits for each room to leave.
const SHUTDOWN_LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The rooms of one node, by room id (locator) and by topic.
#[derive(Clone, Default)]
pub(crate) struct Rooms {
    inner: Arc<Mutex<RoomsInner>>,
}

#[derive(Default)]
struct RoomsInner {
    by_id: HashMap<RoomId, mpsc::Sender<Input>>,
    by_topic: HashMap<String, RoomId>,
    tasks: HashMap<RoomId, tokio::task::AbortHandle>,
}

impl Rooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, RoomsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a room; false if this node is in it already.
    pub(super) fn insert(&self, id: RoomId, topic: String, tx: mpsc::Sender<Input>) -> bool {
        let mut g = self.lock();
        if g.by_id.contains_key(&id) {
            return false;
        }
        g.by_id.insert(id, tx);
        g.by_topic.insert(topic, id);
        true
    }

    /// The room's task, for [`Rooms::abort_all`].
    pub(super) fn set_task(&self, id: RoomId, task: tokio::task::AbortHandle) {
        let mut g = self.lock();
        if g.by_id.contains_key(&id) {
            g.tasks.insert(id, task);
        }
    }

    pub(super) fn remove(&self, id: &RoomId) {
        let mut g = self.lock();
        g.by_id.remove(id);
        g.tasks.remove(id);
        g.by_topic.retain(|_, v| v != id);
    }

    pub(crate) fn gossip(&self, topic: &str, from: PeerId, data: Vec<u8>) {
        let tx = {
            let g = self.lock();
            g.by_topic
                .get(topic)
                .and_then(|id| g.by_id.get(id))
                .cloned()
        };
        if let Some(tx) = tx
            && tx.try_send(Input::Gossip { from, data }).is_err()
        {
            tracing::debug!("room input full: gossip dropped");
        }
    }

    pub(crate) async fn request(&self, from: PeerId, data: Vec<u8>, reply: ResponseHandle) {
        let req = match decode_request(&data) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%from, "{e}");
                let _ = reply.respond(refusal(&e)).await;
                return;
            }
        };
        let tx = self.lock().by_id.get(&req.room).cloned();
        match tx {
            Some(tx) => {
                if let Err(mpsc::error::TrySendError::Full(Input::Request { reply, .. })) = tx
                    .try_send(Input::Request {
                        from,
                        req: Box::new(req),
                        reply,
                    })
                {
                    let _ = reply.respond(refusal(&Refusal::Busy)).await;
                }
            }
            None => {
                let _ = reply.respond(refusal(&Refusal::NotInRoom)).await;
            }
        }
    }

    pub(crate) fn peer_gone(&self, peer: PeerId) {
        let txs: Vec<_> = self.lock().by_id.values().cloned().collect();
        for tx in txs {
            let _ = tx.try_send(Input::PeerGone(peer));
        }
    }

    /// Stop every room task at once, telling nobody (crash simulation). Aborting a task drops
    /// its `JoinSet`, which aborts everything the room spawned.
    pub(crate) fn abort_all(&self) {
        let mut g = self.lock();
        for (_, t) in g.tasks.drain() {
            t.abort();
        }
        g.by_id.clear();
        g.by_topic.clear();
    }

    pub(crate) async fn shutdown_all(&self) {
        let txs: Vec<_> = self.lock().by_id.values().cloned().collect();
        for tx in txs {
            let (done, rx) = oneshot::channel();
            if tx.send(Input::Leave(done)).await.is_ok() {
                let _ = tokio::time::timeout(SHUTDOWN_LEAVE_TIMEOUT, rx).await;
            }
        }
    }
}
