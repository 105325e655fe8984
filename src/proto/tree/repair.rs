//! Repair: what a node does when it loses its parent, and what a grandparent does for the
//! orphans of a lost child.
//!
//! What it decides: when a parent counts as lost (its `Leave`, a link down, an update that
//! drops us or closes a cycle through us, or too long detached upstream), which parent an
//! orphan asks first (the departing parent's named successor, then the backup, then a
//! shallower slot, then the lost parent's parent, which holds the lost parent's slot), and which
//! lost parent an orphan names in its requests so that candidates below it refuse (the cycle
//! guard of [`Orphan::cycle_guard`]). During `repair_settle_ms` a relay only takes parents
//! strictly shallower than its old depth: depth then decreases along every new edge and no
//! cycle can close even on stale information. The backup parent is a random pick among the
//! shallowest directory entries outside our subtree, so the orphans of one relay scatter.

use std::cmp::Reverse;

use super::super::{Millis, NodeId};
use super::admit::JoinReq;
use super::timer::Timer;
use super::{
    DEPTH_DETACHED, JoinKind, MAX_ANCESTORS, Output, Path, SlotAd, TreeEvent, TreeMsg, TreeNode,
    TreeUpdate,
};

/// How long an orphan with children keeps candidates below its lost parent from adopting it.
pub(super) const CYCLE_GUARD_MS: u64 = 2_000;

/// The repair state.
#[derive(Debug, Default)]
pub(super) struct RepairState {
    /// Set while we have lost our parent and look for another.
    pub(super) orphan: Option<Orphan>,
    /// Where we go first if we lose our parent.
    pub(super) backup: Option<NodeId>,
}

/// A repair in progress.
#[derive(Clone, Debug)]
pub(super) struct Orphan {
    pub(super) since: Millis,
    pub(super) old_depth: u16,
    pub(super) lost: Option<NodeId>,
    pub(super) successor: Option<NodeId>,
    /// Our path before the loss (tells a successor grandparent from a handover target).
    pub(super) lost_ancestors: Vec<NodeId>,
    /// We were a leaf handed over elsewhere by a parent that may well stay (a preempting
    /// parent, or a departing one): we cannot close a cycle, so candidates below that parent
    /// need not refuse us.
    pub(super) leaf_handover: bool,
    /// The link to the lost parent went down (it crashed or vanished), rather than a word from
    /// it: only then may its own parent evict it on our word.
    pub(super) link_down: bool,
}

impl Orphan {
    /// The lost parent to name in a join request to `target`. Candidates whose path contains it
    /// refuse: a subtree must not land in a sibling subtree while both repair. A node without
    /// children cannot close a cycle, and the lost parent may be alive (it handed us over), in
    /// which case the guard would shut us out of its whole subtree: a leaf names it only to the
    /// grandparent, which then evicts a dead parent at once.
    ///
    /// A live lost parent (it evicted us, or we left it after its own repair failed) would shut
    /// our subtree out of its whole subtree -- the whole room, if it is the root -- so the guard
    /// lapses after `CYCLE_GUARD_MS`: by then a dead parent's subtree knows it is detached (and
    /// refuses joiners for that reason).
    pub(super) fn cycle_guard(
        &self,
        has_children: bool,
        target: NodeId,
        now: Millis,
    ) -> Option<NodeId> {
        let grandparent = self.lost_ancestors.len() >= 2
            && self.lost_ancestors[self.lost_ancestors.len() - 2] == target;
        if self.leaf_handover && !has_children {
            // The parent that handed us over may well be alive: naming it to the grandparent
            // would have it evicted with its whole subtree.
            return None;
        }
        // Without children now we may still take some before the answer comes (a handover
        // target accepts while it repairs): only a leaf handed over by its parent goes unguarded.
        let guarded = (has_children || !self.leaf_handover)
            && self.lost_ancestors.len() >= 2
            && now < self.since.plus(CYCLE_GUARD_MS);
        self.lost.filter(|_| guarded || grandparent)
    }
}

impl TreeNode {
    pub(super) fn on_leave(&mut self, from: NodeId, successor: Option<NodeId>, now: Millis) {
        if self.up.parent == Some(from) {
            self.out.push(Output::Disconnect { peer: from });
            self.parent_lost(successor.filter(|s| *s != self.id), false, now);
        } else if self.down.children.contains_key(&from) {
            self.out.push(Output::Disconnect { peer: from });
            self.remove_child(from, now);
        } else if self.join.pending.is_some_and(|p| p.target == from) {
            self.give_up_pending(now);
        }
    }

    pub(super) fn parent_lost(&mut self, successor: Option<NodeId>, link_down: bool, now: Millis) {
        if self.is_root {
            return;
        }
        let lost = self.up.parent.take();
        let old_depth = self.depth().unwrap_or(self.up.last_depth).max(1);
        let lost_ancestors = self.up.path.take().map(|p| p.ancestors).unwrap_or_default();
        let leaf_handover = self.down.children.is_empty()
            && successor.is_some_and(|s| !lost_ancestors.contains(&s));
        self.timers.clear(Timer::UpstreamGrace);
        self.repair.orphan = Some(Orphan {
            since: now,
            old_depth,
            lost,
            successor,
            lost_ancestors,
            leaf_handover,
            link_down,
        });
        if let Some(p) = self.join.pending.as_mut() {
            // A move in progress becomes the repair (with a repair's shorter timeout).
            p.kind = JoinKind::Repair;
            self.arm_join_answer();
        }
        if let Some(l) = lost {
            self.emit(TreeEvent::Orphaned { lost: l });
        }
        self.emit(TreeEvent::DepthChanged { depth: None });
        // Our subtree learns it is detached (it refuses joiners meanwhile).
        self.publish_now(now);
        self.summary_dirty(now);
        self.timers.clear(Timer::Retry);
        self.attempt_join(now);
    }

    pub(super) fn on_parent_update(&mut self, upd: TreeUpdate, now: Millis) {
        self.up.parent_capacity = upd.capacity;
        self.up.parent_children = upd.children.len().min(u16::MAX as usize) as u16;
        if !upd.children.contains(&self.id) {
            // The parent dropped us.
            self.parent_lost(None, false, now);
            return;
        }
        if upd.depth == DEPTH_DETACHED {
            if self.up.path.take().is_some() {
                self.timers
                    .set(Timer::UpstreamGrace, now.plus(self.cfg.upstream_grace_ms));
                self.emit(TreeEvent::DepthChanged { depth: None });
                self.publish_now(now);
                self.summary_dirty(now);
            }
            return;
        }
        if upd.ancestors.len() >= MAX_ANCESTORS || upd.ancestors.contains(&self.id) {
            // A cycle closed through us: get out of it.
            if let Some(p) = self.up.parent {
                self.send(p, TreeMsg::Leave { successor: None });
                self.out.push(Output::Disconnect { peer: p });
            }
            self.parent_lost(None, false, now);
            return;
        }
        let mut ancestors = upd.ancestors;
        ancestors.push(upd.peer);
        let new_path = Path {
            depth: upd.depth.saturating_add(1),
            ancestors,
        };
        if self.up.path.as_ref() != Some(&new_path) {
            let depth_changed = self.depth() != Some(new_path.depth);
            self.up.last_depth = new_path.depth;
            let d = new_path.depth;
            self.up.path = Some(new_path);
            self.timers.clear(Timer::UpstreamGrace);
            if depth_changed {
                self.emit(TreeEvent::DepthChanged { depth: Some(d) });
                self.summary_dirty(now);
            }
            self.publish_now(now);
        }
    }

    /// A random pick among the shallowest usable candidates (shallower than us when possible), so
    /// siblings scatter.
    pub(super) fn choose_backup(&mut self, now: Millis) {
        if self.is_root {
            return;
        }
        let cands = self.candidates(now);
        let my = self.depth().unwrap_or(self.up.last_depth);
        let shallower: Vec<SlotAd> = cands.iter().filter(|a| a.depth < my).copied().collect();
        let pool = if shallower.is_empty() {
            &cands
        } else {
            &shallower
        };
        let Some(min) = pool.iter().map(|a| a.depth).min() else {
            self.repair.backup = None;
            return;
        };
        let top: Vec<NodeId> = pool
            .iter()
            .filter(|a| a.depth == min)
            .map(|a| a.peer)
            .collect();
        let i = self.rng.below(top.len() as u64) as usize;
        self.repair.backup = top.get(i).copied();
    }

    /// Where each child goes when we leave gracefully. The most capable child takes our slot
    /// at our parent; its siblings are directed to the free slots of its subtree (disjoint
    /// from theirs, so the plan has no cycle), where they keep their depth. Those without a
    /// slot fall back on their backups.
    pub(super) fn successors_on_leave(&self) -> Vec<(NodeId, Option<NodeId>)> {
        let successor_child = self
            .down
            .children
            .iter()
            .max_by_key(|(id, c)| (c.capacity, c.has_children, Reverse(**id)))
            .map(|(id, _)| *id);
        let mut slots: Vec<SlotAd> = successor_child
            .and_then(|s| self.down.children.get(&s))
            .map(|c| c.summary.clone())
            .unwrap_or_default();
        let mut plan = Vec::with_capacity(self.down.children.len());
        for &c in self.down.children.keys() {
            let successor = if Some(c) == successor_child {
                self.up.parent.filter(|_| self.up.path.is_some())
            } else if let (Some(_), Some(d)) = (successor_child, self.depth()) {
                // Only the successor and its children: the orphan ends at most one level deeper.
                slots
                    .iter_mut()
                    .find(|a| a.free > 0 && a.depth <= d + 2)
                    .map(|a| {
                        a.free -= 1;
                        a.peer
                    })
            } else {
                None
            };
            plan.push((c, successor));
        }
        plan
    }

    /// Detached upstream for longer than `upstream_grace_ms`: our ancestors could not repair
    /// in time, so we repair ourselves.
    pub(super) fn upstream_grace_over(&mut self, now: Millis) {
        if let Some(p) = self.up.parent {
            self.send(p, TreeMsg::Leave { successor: None });
        }
        self.parent_lost(None, false, now);
    }

    /// An orphan's next request: the departing parent's named successor first, then the
    /// backup, a shallower slot, the lost parent's parent, any slot once the settle time is
    /// over, and the root of a starved room; with none of them, a fresh snapshot.
    pub(super) fn attempt_repair(&mut self, o: &Orphan, now: Millis) {
        // A successor our media cannot reach is no plan (a Leave naming it says nothing of
        // the path between us).
        if let Some(s) = o.successor.filter(|s| !self.unreachable(*s, now)) {
            self.join_successor(o, s, now);
            return;
        }
        let target = match self.repair_target(o, now) {
            RepairTarget::Ask(t, max_depth) => Some((t, max_depth)),
            RepairTarget::Wait(at) => {
                self.timers.set(Timer::Retry, at);
                return;
            }
            // Nobody we know has a free slot (a starved room): ask the root, which makes room
            // for a peer that can relay, as for a newcomer.
            RepairTarget::Nobody => self.starved_root(now).map(|r| (r, None)),
        };
        match target {
            Some((t, md)) => {
                let guard = o.cycle_guard(!self.down.children.is_empty(), t, now);
                self.send_join(t, JoinKind::Repair, md, guard, now);
            }
            None => self.need_snapshot(now),
        }
    }

    /// The departing parent's plan comes first, even from a candidate that refused us lately
    /// (its slot is the one the departure frees). Once tried, it is dropped.
    fn join_successor(&mut self, o: &Orphan, s: NodeId, now: Millis) {
        if let Some(orphan) = self.repair.orphan.as_mut() {
            orphan.successor = None;
        }
        // Our old grandparent (a repair, bounded in depth), or a slot in a sibling's subtree
        // (a handover, accepted even while that sibling repairs).
        let kind = if o.lost_ancestors.contains(&s) {
            JoinKind::Repair
        } else {
            JoinKind::Handover
        };
        let md = (kind == JoinKind::Repair).then(|| o.old_depth.saturating_sub(1));
        let guard = o.cycle_guard(!self.down.children.is_empty(), s, now);
        self.send_join(s, kind, md, guard, now);
    }

    /// Whom to ask among the candidates we know.
    fn repair_target(&mut self, o: &Orphan, now: Millis) -> RepairTarget {
        // Without children we cannot close a cycle: no need to wait for shallower parents.
        let strict =
            !self.down.children.is_empty() && now < o.since.plus(self.cfg.repair_settle_ms);
        let cands = self.candidates(now);
        let shallower: Vec<SlotAd> = cands
            .iter()
            .filter(|a| a.depth < o.old_depth)
            .copied()
            .collect();
        let backup = self
            .repair
            .backup
            .and_then(|b| shallower.iter().find(|a| a.peer == b).copied());
        // The lost parent's parent: alive as of our last update, it has the slot of the
        // lost parent (it evicts it on our word), and fresh summaries of the neighbouring
        // subtrees to forward us to; a directory entry may be long gone.
        let grandparent = (o.lost_ancestors.len() >= 2)
            .then(|| o.lost_ancestors[o.lost_ancestors.len() - 2])
            .filter(|g| *g != self.id && !self.avoided(*g, now));
        let above = Some(o.old_depth.saturating_sub(1));
        if let Some(b) = backup {
            RepairTarget::Ask(b.peer, above)
        } else if let Some(a) = self.pick(&shallower) {
            RepairTarget::Ask(a.peer, above)
        } else if let Some(g) = grandparent {
            RepairTarget::Ask(g, above)
        } else if strict {
            RepairTarget::Wait(o.since.plus(self.cfg.repair_settle_ms))
        } else if let Some(a) = self.pick(&cands) {
            RepairTarget::Ask(a.peer, None)
        } else {
            RepairTarget::Nobody
        }
    }

    /// As the lost parent's parent: a child of our child `l` says its link to `l` went down.
    /// `l` crashed or left (its own word may still be on the way, and our transport notices
    /// later); its slot is the orphan's best place. Only a peer `l` listed as its child may say
    /// so, and only when its link went down: a live `l` that told it to go keeps its place.
    pub(super) fn evict_lost_child(&mut self, req: &JoinReq, now: Millis) {
        if req.kind == JoinKind::Repair
            && req.parent_gone
            && let Some(l) = req.lost_parent
            && self
                .down
                .children
                .get(&l)
                .is_some_and(|c| c.kids.contains(&req.joiner))
        {
            self.send(l, TreeMsg::Leave { successor: None });
            self.out.push(Output::Disconnect { peer: l });
            self.remove_child(l, now);
        }
    }
}

/// Where an orphan's next repair request goes.
enum RepairTarget {
    /// This peer, refused if deeper than this.
    Ask(NodeId, Option<u16>),
    /// Only strictly shallower parents will do for now: look again at this time.
    Wait(Millis),
    /// Nobody we know has a free slot.
    Nobody,
}
