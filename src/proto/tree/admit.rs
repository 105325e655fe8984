//! The parent's side: deciding on a [`TreeMsg::Join`] that reached us.
//!
//! [`TreeNode::on_join`] applies these rules in order, each a function of its own:
//!
//! 1. a promotion request we can grant takes the joiner in beside its parent (see
//!    [`super::rebalance`]); one we cannot grant is an ordinary move;
//! 2. our former parent, moving under us after our promotion, waits for a slot;
//! 3. an orphan whose link to our child went down, and which that child listed as its own,
//!    gets the child's slot: the child is evicted (a repair's best place is its lost parent's);
//! 4. the joiner is refused if accepting could close a cycle, if we are detached, too deep or
//!    full (a handover, planned by a departing parent, only checks cycles and room);
//! 5. full: the request is passed down to a free slot of our subtree, fresher than the
//!    joiner's directory (saves it a round trip per level);
//! 6. full and knowing no free slot anywhere (a starved room): a weaker child's slot goes to a
//!    joiner that can relay, or the request goes to one of our relay children;
//! 7. otherwise refuse with hints (the best free slots of our subtree), or accept.
//!
//! Why this order: cycle safety first (a cycle cuts a whole subtree off the stream), then the
//! cheapest way to a place for the joiner, and preemption only as a last resort (it costs a
//! leaf a short outage, so at most once per `PREEMPT_GAP_MS`).

use std::collections::BTreeMap;

use super::super::{Millis, NodeId};
use super::timer::Timer;
use super::{
    JoinKind, MAX_SLOTS_IN, Output, RefuseReason, SlotAd, TreeEvent, TreeMsg, TreeNode, TreeUpdate,
};

/// Minimum gap between two preemptions by one parent: a last resort against starvation, each
/// costs a leaf a short outage.
const PREEMPT_GAP_MS: u64 = 10_000;

/// How many times a join request may be passed down by full candidates.
const MAX_FORWARD: u8 = 3;

/// The parent's state.
#[derive(Debug, Default)]
pub(super) struct Downstream {
    pub(super) children: BTreeMap<NodeId, ChildInfo>,
    /// Last relocation order to a leaf child (at most one per `RELOCATE_GAP_MS`).
    pub(super) last_relocate_at: Option<Millis>,
    /// Last time a weaker child was handed over to make room for a peer that can relay.
    pub(super) last_preempt_at: Option<Millis>,
}

/// What a parent knows of one child.
#[derive(Clone, Debug)]
pub(super) struct ChildInfo {
    /// Its capacity, as it claimed on joining, then from its updates.
    pub(super) capacity: u16,
    /// Whether it relays (from its last update).
    pub(super) has_children: bool,
    /// The child's own children, from its last signed update: only they may report it lost.
    pub(super) kids: Vec<NodeId>,
    /// The best free slots of its subtree, from its last summary.
    pub(super) summary: Vec<SlotAd>,
}

/// A join request as a candidate sees it: [`TreeMsg::Join`] with the joiner resolved (the
/// sender, or the peer a full candidate forwarded it for).
#[derive(Clone, Copy, Debug)]
pub(super) struct JoinReq {
    pub(super) joiner: NodeId,
    pub(super) kind: JoinKind,
    pub(super) capacity: u16,
    pub(super) max_depth: Option<u16>,
    pub(super) lost_parent: Option<NodeId>,
    pub(super) hops: u8,
    pub(super) parent_gone: bool,
}

impl JoinReq {
    /// A promotion we cannot grant is an ordinary move.
    fn as_move_if_promotion(self) -> JoinReq {
        let kind = if self.kind == JoinKind::Promote {
            JoinKind::Move
        } else {
            self.kind
        };
        JoinReq { kind, ..self }
    }

    /// The request passed one level down, on the joiner's behalf (the answer goes to the
    /// joiner). Never claims the joiner's parent is gone: only the joiner's own word, to the
    /// lost parent's parent, may evict.
    fn forwarded(&self) -> TreeMsg {
        TreeMsg::Join {
            kind: self.kind,
            capacity: self.capacity,
            max_depth: self.max_depth,
            lost_parent: self.lost_parent,
            joiner: Some(self.joiner),
            hops: self.hops + 1,
            parent_gone: false,
        }
    }
}

impl TreeNode {
    pub(super) fn free(&self) -> u16 {
        self.capacity
            .saturating_sub(self.down.children.len().min(u16::MAX as usize) as u16)
    }

    /// A child's signed update: what we need of it for our decisions (from anyone else:
    /// ignored).
    pub(super) fn on_child_update(&mut self, from: NodeId, update: TreeUpdate) {
        if let Some(c) = self.down.children.get_mut(&from) {
            c.capacity = update.capacity;
            c.has_children = !update.children.is_empty();
            c.kids = update.children;
            c.kids.truncate(MAX_SLOTS_IN);
        }
    }

    /// Decide on a join request: the rules of the module docs, in order.
    pub(super) fn on_join(&mut self, req: JoinReq, now: Millis) {
        if req.joiner == self.id {
            return;
        }
        if req.kind == JoinKind::Promote && self.try_promote(&req, now) {
            return;
        }
        // A promotion we cannot grant is an ordinary move.
        let req = req.as_move_if_promotion();
        if self.hold_former_parent(&req, now) {
            return;
        }
        self.evict_lost_child(&req, now);
        let mut reason = self.refusal(&req);
        if reason == Some(RefuseReason::Full) {
            if self.forward_join(&req) {
                return;
            }
            if self.preempt_for(&req, now) {
                reason = None;
            } else if self.pass_to_relay_child(&req) {
                return;
            }
        }
        match reason {
            Some(reason) => self.refuse(&req, reason, now),
            None => self.admit(&req, now),
        }
    }

    /// Our former parent, moving under us after our promotion while the child we sent to it has
    /// not left yet: its request waits for that slot (answered from `remove_child`).
    fn hold_former_parent(&mut self, req: &JoinReq, now: Millis) -> bool {
        if req.kind == JoinKind::Move
            && self.moves.promoted_from.is_some_and(|o| o == req.joiner)
            && self
                .timers
                .get(Timer::FormerParentWait)
                .is_some_and(|t| now < t)
        {
            if self.free() == 0 && !self.down.children.contains_key(&req.joiner) {
                self.moves.held = Some(*req);
                return true;
            }
            self.moves.promoted_from = None;
            self.timers.clear(Timer::FormerParentWait);
        }
        false
    }

    /// Why we cannot take the joiner, before any attempt to find it room elsewhere (`None`:
    /// we can). A duplicate request (our Accept was lost or is in flight) is accepted again.
    fn refusal(&self, req: &JoinReq) -> Option<RefuseReason> {
        let from = req.joiner;
        if self.down.children.contains_key(&from) {
            None
        } else if req.kind == JoinKind::Handover {
            // The departing parent made the plan acyclic: only our own path and room matter,
            // even while we repair.
            if self.ancestors().contains(&from) || self.up.parent == Some(from) {
                Some(RefuseReason::Cycle)
            } else if self.free() == 0 {
                Some(RefuseReason::Full)
            } else {
                None
            }
        } else if self.up.path.is_none() {
            Some(RefuseReason::NotAttached)
        } else if self.ancestors().contains(&from)
            || req
                .lost_parent
                .is_some_and(|l| l == self.id || self.ancestors().contains(&l))
            || self.up.parent == Some(from)
            || self.join.pending.is_some_and(|p| p.target == from)
        {
            Some(RefuseReason::Cycle)
        } else if req
            .max_depth
            .is_some_and(|m| self.depth().is_some_and(|d| d > m))
        {
            Some(RefuseReason::TooDeep)
        } else if self.free() == 0 {
            Some(RefuseReason::Full)
        } else {
            None
        }
    }

    /// Starved (full, and no free slot known anywhere): give a joiner that can relay the slot
    /// of a weaker child, and hand that child over to it.
    fn preempt_for(&mut self, req: &JoinReq, now: Millis) -> bool {
        if !(matches!(req.kind, JoinKind::Repair | JoinKind::New)
            && self.knows_no_free_slot()
            && self
                .down
                .last_preempt_at
                .is_none_or(|t| now.since(t) >= PREEMPT_GAP_MS))
        {
            return false;
        }
        let Some(v) = self.preemptible_child(req.capacity) else {
            return false;
        };
        // Nowhere below to send it: rather than leave a more capable peer (and the subtree
        // it may carry) without a place, give it a weaker child's slot and hand that child
        // over to it (the newcomer has room: it is more capable than the child, and if it
        // is full after all the child is refused with hints and goes elsewhere). Without
        // this, a room whose top slots are all held by weak peers starves its relays.
        self.send(
            v,
            TreeMsg::Leave {
                successor: Some(req.joiner),
            },
        );
        self.out.push(Output::Disconnect { peer: v });
        self.remove_child(v, now);
        self.down.last_preempt_at = Some(now);
        true
    }

    /// Starved, and no weaker child here: one of our relay children may have a slot.
    fn pass_to_relay_child(&mut self, req: &JoinReq) -> bool {
        if !(matches!(req.kind, JoinKind::Repair | JoinKind::New)
            && req.capacity > 0
            && req.hops < MAX_FORWARD
            && self.knows_no_free_slot())
        {
            return false;
        }
        let relays: Vec<NodeId> = self
            .down
            .children
            .iter()
            .filter(|(id, c)| c.has_children && Some(**id) != req.lost_parent && **id != req.joiner)
            .map(|(id, _)| *id)
            .collect();
        if relays.is_empty() {
            return false;
        }
        let t = relays[self.rng.below(relays.len() as u64) as usize];
        self.send(t, req.forwarded());
        true
    }

    /// Refuse, with hints when full: the best free slots of our subtree, fresher than the
    /// joiner's directory. A full parent asked for a move by a more capable peer also makes
    /// room for the next one.
    fn refuse(&mut self, req: &JoinReq, reason: RefuseReason, now: Millis) {
        let from = req.joiner;
        let hints: Vec<SlotAd> = if reason == RefuseReason::Full {
            self.compute_summary(self.cfg.summary_len)
                .into_iter()
                .filter(|a| a.peer != self.id && a.peer != from)
                .collect()
        } else {
            Vec::new()
        };
        self.send(from, TreeMsg::Refuse { reason, hints });
        self.out.push(Output::RefuseChild { peer: from, reason });
        if reason == RefuseReason::Full && req.kind == JoinKind::Move {
            self.maybe_relocate_for(req.capacity, now);
        }
    }

    /// Take the joiner as a child (again, for a duplicate request: the answer only).
    fn admit(&mut self, req: &JoinReq, now: Millis) {
        let from = req.joiner;
        let fresh = !self.down.children.contains_key(&from);
        self.down.children.entry(from).or_insert(ChildInfo {
            capacity: req.capacity,
            has_children: false,
            kids: Vec::new(),
            summary: Vec::new(),
        });
        let parent = self.current_update(now);
        let directory = self.directory_for(from);
        self.send(from, TreeMsg::Accept { parent, directory });
        if fresh {
            self.out.push(Output::AcceptChild { peer: from });
            self.emit(TreeEvent::ChildAdded(from));
            self.children_changed(now);
        }
    }

    /// A full candidate passes the request to a free slot of its subtree, whose summary is fresher
    /// than what the joiner holds (saves the joiner a round trip per level).
    fn forward_join(&mut self, req: &JoinReq) -> bool {
        if req.kind == JoinKind::Handover || req.hops >= MAX_FORWARD {
            // A handover goes where the departing parent planned; a request passed down this
            // often would wander.
            return false;
        }
        let cands: Vec<SlotAd> = self
            .down
            .children
            .iter()
            .filter(|(id, _)| Some(**id) != req.lost_parent)
            .flat_map(|(_, c)| c.summary.iter())
            .filter(|a| {
                a.free > 0
                    && a.peer != req.joiner
                    && a.peer != self.id
                    && req.max_depth.is_none_or(|m| a.depth <= m)
            })
            .copied()
            .collect();
        let Some(target) = self.pick(&cands) else {
            return false;
        };
        // Book the slot in our copy so the next joiner goes elsewhere.
        for c in self.down.children.values_mut() {
            for a in c.summary.iter_mut().filter(|a| a.peer == target.peer) {
                a.free = a.free.saturating_sub(1);
            }
        }
        self.send(target.peer, req.forwarded());
        true
    }

    /// Neither our subtree nor our directory shows a free slot: the room may be starved of
    /// capacity at the top (its relays lost and its slots held by leaf-only peers).
    fn knows_no_free_slot(&self) -> bool {
        self.compute_summary(1).is_empty() && self.slots.directory.iter().all(|a| a.free == 0)
    }

    /// The child to give up for a joiner that can relay: a leaf-only child (capacity 0: it can
    /// have no children, whatever its last update says), else the least capable child if it is
    /// less capable than the joiner (it is handed to the joiner with its subtree, which has a
    /// short cut: rare, the room is starved).
    fn preemptible_child(&self, capacity: u16) -> Option<NodeId> {
        if capacity == 0 {
            return None;
        }
        self.down
            .children
            .iter()
            .filter(|(_, c)| c.capacity < capacity)
            .min_by_key(|(id, c)| (c.capacity, c.has_children, **id))
            .map(|(id, _)| *id)
    }

    pub(super) fn remove_child(&mut self, c: NodeId, now: Millis) {
        if self.down.children.remove(&c).is_some() {
            self.emit(TreeEvent::ChildRemoved(c));
            self.children_changed(now);
            if self
                .moves
                .promotion
                .is_some_and(|p| p.old == c || p.new == c)
            {
                self.moves.promotion = None;
                self.timers.clear(Timer::PromotionEnd);
            }
            if self.free() > 0
                && let Some(h) = self.moves.held.take()
            {
                self.on_join(h, now);
            }
        }
    }

    pub(super) fn children_changed(&mut self, now: Millis) {
        if !self.timers.is_set(Timer::Publish) {
            self.timers
                .set(Timer::Publish, now.plus(self.cfg.publish_coalesce_ms));
        }
        self.summary_dirty(now);
    }
}
