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

use super::super::{Millis, NodeId};
use super::{JoinKind, Output, RefuseReason, SlotAd, TreeEvent, TreeMsg, TreeNode};

/// Minimum gap between two preemptions by one parent: a last resort against starvation, each
/// costs a leaf a short outage.
pub(super) const PREEMPT_GAP_MS: u64 = 10_000;

/// How many times a join request may be passed down by full candidates.
pub(super) const MAX_FORWARD: u8 = 3;

#[derive(Clone, Debug)]
pub(super) struct ChildInfo {
    pub(super) capacity: u16,
    pub(super) has_children: bool,
    /// The child's own children, from its last signed update: only they may report it lost.
    pub(super) kids: Vec<NodeId>,
    pub(super) summary: Vec<SlotAd>,
}

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

impl TreeNode {
    pub(super) fn free(&self) -> u16 {
        self.capacity
            .saturating_sub(self.children.len().min(u16::MAX as usize) as u16)
    }

    pub(super) fn on_join(&mut self, req: JoinReq, now: Millis) {
        let JoinReq {
            joiner: from,
            kind,
            capacity,
            max_depth,
            lost_parent,
            hops,
            parent_gone,
        } = req;
        if from == self.id {
            return;
        }
        if kind == JoinKind::Promote && self.try_promote(&req, now) {
            return;
        }
        // A promotion we cannot grant is an ordinary move.
        let req = JoinReq {
            kind: if kind == JoinKind::Promote {
                JoinKind::Move
            } else {
                kind
            },
            ..req
        };
        let kind = req.kind;
        if kind == JoinKind::Move
            && self
                .promoted_from
                .is_some_and(|(o, t)| o == from && now < t)
        {
            if self.free() == 0 && !self.children.contains_key(&from) {
                // Our former parent, while the child we sent to it has not left yet.
                self.held = Some(req);
                return;
            }
            self.promoted_from = None;
        }
        let handover = kind == JoinKind::Handover;
        if kind == JoinKind::Repair
            && parent_gone
            && let Some(l) = lost_parent
            && self
                .children
                .get(&l)
                .is_some_and(|c| c.kids.contains(&from))
        {
            // A child of our child `l` lost it: `l` crashed or left (its own word may still be on
            // the way, and our transport notices later). Its slot is the orphan's best place.
            self.send(l, TreeMsg::Leave { successor: None });
            self.out.push_back(Output::Disconnect { peer: l });
            self.remove_child(l, now);
        }
        let reason = if self.children.contains_key(&from) {
            None // duplicate (our Accept was lost or is in flight): accept again
        } else if handover {
            if self.ancestors().contains(&from) || self.parent == Some(from) {
                Some(RefuseReason::Cycle)
            } else if self.free() == 0 {
                Some(RefuseReason::Full)
            } else {
                None
            }
        } else if self.path.is_none() {
            Some(RefuseReason::NotAttached)
        } else if self.ancestors().contains(&from)
            || lost_parent.is_some_and(|l| l == self.id || self.ancestors().contains(&l))
            || self.parent == Some(from)
            || self.pending.is_some_and(|p| p.target == from)
        {
            Some(RefuseReason::Cycle)
        } else if max_depth.is_some_and(|m| self.depth().is_some_and(|d| d > m)) {
            Some(RefuseReason::TooDeep)
        } else if self.free() == 0 {
            Some(RefuseReason::Full)
        } else {
            None
        };
        if reason == Some(RefuseReason::Full)
            && !handover
            && hops < MAX_FORWARD
            && self.forward_join(&req, now)
        {
            return;
        }
        let mut reason = reason;
        if reason == Some(RefuseReason::Full)
            && matches!(kind, JoinKind::Repair | JoinKind::New)
            && self.knows_no_free_slot()
            && self
                .last_preempt_at
                .is_none_or(|t| now.since(t) >= PREEMPT_GAP_MS)
            && let Some(v) = self.preemptible_child(capacity)
        {
            // Nowhere below to send it: rather than leave a more capable peer (and the subtree
            // it may carry) without a place, give it a weaker child's slot and hand that child
            // over to it (the newcomer has room: it is more capable than the child, and if it
            // is full after all the child is refused with hints and goes elsewhere). Without
            // this, a room whose top slots are all held by weak peers starves its relays.
            self.send(
                v,
                TreeMsg::Leave {
                    successor: Some(from),
                },
            );
            self.out.push_back(Output::Disconnect { peer: v });
            self.remove_child(v, now);
            self.last_preempt_at = Some(now);
            reason = None;
        }
        if reason == Some(RefuseReason::Full)
            && matches!(kind, JoinKind::Repair | JoinKind::New)
            && capacity > 0
            && hops < MAX_FORWARD
            && self.knows_no_free_slot()
        {
            // Starved, and no weaker child here: one of our relay children may have one.
            let relays: Vec<NodeId> = self
                .children
                .iter()
                .filter(|(id, c)| c.has_children && Some(**id) != lost_parent && **id != from)
                .map(|(id, _)| *id)
                .collect();
            if !relays.is_empty() {
                let t = relays[self.rng.below(relays.len() as u64) as usize];
                self.send(
                    t,
                    TreeMsg::Join {
                        kind,
                        capacity,
                        max_depth,
                        lost_parent,
                        joiner: Some(from),
                        hops: hops + 1,
                        parent_gone: false,
                    },
                );
                return;
            }
        }
        if let Some(reason) = reason {
            let hints: Vec<SlotAd> = if reason == RefuseReason::Full {
                self.compute_summary(self.cfg.summary_len)
                    .into_iter()
                    .filter(|a| a.peer != self.id && a.peer != from)
                    .collect()
            } else {
                Vec::new()
            };
            self.send(from, TreeMsg::Refuse { reason, hints });
            self.out
                .push_back(Output::RefuseChild { peer: from, reason });
            if reason == RefuseReason::Full && kind == JoinKind::Move {
                self.maybe_relocate_for(capacity, now);
            }
            return;
        }
        let fresh = !self.children.contains_key(&from);
        self.children.entry(from).or_insert(ChildInfo {
            capacity,
            has_children: false,
            kids: Vec::new(),
            summary: Vec::new(),
        });
        let parent = self.current_update(now);
        let directory = self.directory_for(from);
        self.send(from, TreeMsg::Accept { parent, directory });
        if fresh {
            self.out.push_back(Output::AcceptChild { peer: from });
            self.emit(TreeEvent::ChildAdded(from));
            self.children_changed(now);
        }
    }

    /// A full candidate passes the request to a free slot of its subtree, whose summary is fresher
    /// than what the joiner holds (saves the joiner a round trip per level).
    pub(super) fn forward_join(&mut self, req: &JoinReq, now: Millis) -> bool {
        let _ = now;
        let cands: Vec<SlotAd> = self
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
        for c in self.children.values_mut() {
            for a in c.summary.iter_mut().filter(|a| a.peer == target.peer) {
                a.free = a.free.saturating_sub(1);
            }
        }
        self.send(
            target.peer,
            TreeMsg::Join {
                kind: req.kind,
                capacity: req.capacity,
                max_depth: req.max_depth,
                lost_parent: req.lost_parent,
                joiner: Some(req.joiner),
                hops: req.hops + 1,
                parent_gone: false,
            },
        );
        true
    }

    /// Neither our subtree nor our directory shows a free slot: the room may be starved of
    /// capacity at the top (its relays lost and its slots held by leaf-only peers).
    pub(super) fn knows_no_free_slot(&self) -> bool {
        self.compute_summary(1).is_empty() && self.directory.iter().all(|a| a.free == 0)
    }

    /// The child to give up for a joiner that can relay: a leaf-only child (capacity 0: it can
    /// have no children, whatever its last update says), else the least capable child if it is
    /// less capable than the joiner (it is handed to the joiner with its subtree, which has a
    /// short cut: rare, the room is starved).
    pub(super) fn preemptible_child(&self, capacity: u16) -> Option<NodeId> {
        if capacity == 0 {
            return None;
        }
        self.children
            .iter()
            .filter(|(_, c)| c.capacity < capacity)
            .min_by_key(|(id, c)| (c.capacity, c.has_children, **id))
            .map(|(id, _)| *id)
    }

    pub(super) fn remove_child(&mut self, c: NodeId, now: Millis) {
        if self.children.remove(&c).is_some() {
            self.emit(TreeEvent::ChildRemoved(c));
            self.children_changed(now);
            if self.promotion.is_some_and(|p| p.old == c || p.new == c) {
                self.promotion = None;
            }
            if self.free() > 0
                && let Some(h) = self.held.take()
            {
                self.on_join(h, now);
            }
        }
    }

    pub(super) fn children_changed(&mut self, now: Millis) {
        if self.publish_due.is_none() {
            self.publish_due = Some(now.plus(self.cfg.publish_coalesce_ms));
        }
        self.summary_dirty(now);
    }
}
