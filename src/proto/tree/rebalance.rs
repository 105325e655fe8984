//! Rebalancing: make-before-break moves that bring capable peers up and weak ones down.
//!
//! What it decides: every `rebalance_interval` (jittered) a node looks for a free slot two
//! levels above it (one, if it is more capable than its parent) and moves there, attaching to
//! the new parent before leaving the old one so nobody's stream is cut. With no such slot, a peer
//! more capable than its parent asks its grandparent for a **promotion**: the grandparent takes
//! it in beside the parent, one child over its capacity for at most `PROMOTION_DEADLINE_MS`,
//! and the former parent moves under the promoted peer ([`TreeMsg::MoveUnder`]). A full parent
//! asked by a more capable node relocates one of its weaker leaf children instead. Moves are
//! bounded in depth (strictly above the mover, but for the former parent, which goes to its
//! promoted child's level), so stale paths cannot close a cycle. A refused or unanswered move
//! doubles the gap to the next check, up to 4 times: the whole room holds the same directory
//! and its shallowest entries would otherwise draw everyone's moves.

use super::super::{Millis, NodeId};
use super::admit::{ChildInfo, JoinReq};
use super::slots::dedup_ads;
use super::timer::Timer;
use super::{JoinKind, Output, RefuseReason, SlotAd, TreeEvent, TreeMsg, TreeNode};

/// Minimum gap between two relocation orders from one parent.
const RELOCATE_GAP_MS: u64 = 10_000;

/// Failed moves in a row beyond which the rebalancing gap stops doubling (4 times).
const MAX_MOVE_BACKOFF: u8 = 2;

/// A promotion holds one child over the grandparent's capacity for at most this long; then the
/// former parent is handed to the promoted child the hard way.
pub(super) const PROMOTION_DEADLINE_MS: u64 = 2_000;

/// Gap between two promotions granted by one parent.
const PROMOTION_GAP_MS: u64 = 10_000;

/// Rebalancing and promotions.
#[derive(Debug, Default)]
pub(super) struct Moves {
    /// Failed moves in a row: each doubles the gap to the next rebalancing check, so nodes
    /// whose directory is stale do not flood the few shallow slots it names.
    pub(super) move_failures: u8,
    /// As grandparent: a promotion in flight (one child over capacity until it ends, at the
    /// latest at [`Timer::PromotionEnd`]).
    pub(super) promotion: Option<Promotion>,
    pub(super) last_promotion_at: Option<Millis>,
    /// As promoted peer: the former parent, which is to move under us (until
    /// [`Timer::FormerParentWait`]).
    pub(super) promoted_from: Option<NodeId>,
    /// As promoted peer with no free slot: the former parent's move, answered once the child
    /// we sent to it has left.
    pub(super) held: Option<JoinReq>,
}

/// A promotion granted by this node: `new` took the place of `old`, which is to move under it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Promotion {
    pub(super) old: NodeId,
    pub(super) new: NodeId,
}

impl TreeNode {
    /// Candidates for a move: the directory and the hints together. Hints outlive the join or
    /// refused move that brought them (they are cleared only by an accept), and a refused move
    /// leaves those of a deep subtree: taken alone they would hide the directory's shallow slots
    /// from every later move, and pin a sunk subtree where it is.
    fn move_candidates(&self, now: Millis) -> Vec<SlotAd> {
        let mut v: Vec<SlotAd> = self
            .join
            .hints
            .iter()
            .chain(self.slots.directory.iter())
            .filter(|a| self.usable(a, now))
            .copied()
            .collect();
        dedup_ads(&mut v);
        v
    }

    pub(super) fn on_relocate(&mut self, from: NodeId, now: Millis) {
        if self.up.parent != Some(from)
            || !self.down.children.is_empty()
            || self.join.pending.is_some()
            || self.depth().is_none()
        {
            return;
        }
        let cands = self.candidates(now);
        if let Some(a) = self.pick(&cands) {
            // Any depth will do: we are a leaf, the slot is wanted by a more capable peer.
            self.send_join(a.peer, JoinKind::Move, None, None, now);
        }
    }

    fn rebalance_gap(&mut self) -> u64 {
        let base = self.cfg.rebalance_interval_ms;
        (base / 2 + self.rng.below(base.max(1))) << self.moves.move_failures.min(MAX_MOVE_BACKOFF)
    }

    /// A move was refused or not answered: back off.
    pub(super) fn move_failed(&mut self, now: Millis) {
        self.moves.move_failures = self
            .moves
            .move_failures
            .saturating_add(1)
            .min(MAX_MOVE_BACKOFF);
        if self.cfg.rebalance_interval_ms > 0 {
            let at = now.plus(self.rebalance_gap());
            self.timers.set(Timer::Rebalance, at);
        }
    }

    pub(super) fn rebalance(&mut self, now: Millis) {
        if self.cfg.rebalance_interval_ms == 0 {
            return;
        }
        let at = now.plus(self.rebalance_gap());
        self.timers.set(Timer::Rebalance, at);
        if self.is_root
            || self.join.pending.is_some()
            || self.repair.orphan.is_some()
            || self.moves.promotion.is_some()
            || self.moves.promoted_from.is_some()
        {
            return;
        }
        let Some(d) = self.depth() else { return };
        if d < 2 || (self.capacity == 0 && self.down.children.is_empty()) {
            return;
        }
        let more_capable = self.capacity > self.up.parent_capacity;
        let cands: Vec<SlotAd> = self
            .move_candidates(now)
            .into_iter()
            .filter(|a| a.depth + 2 <= d)
            .collect();
        if let Some(a) = self.pick(&cands) {
            let worthwhile = more_capable || a.depth + 3 <= d;
            if worthwhile {
                self.send_join(a.peer, JoinKind::Move, Some(d - 2), None, now);
                return;
            }
        }
        if more_capable
            && self.capacity > 1
            && (self.free() >= self.up.parent_children || !self.down.children.is_empty())
            && self.moves.promotion.is_none()
            && self.moves.promoted_from.is_none()
        {
            // No free slot above: ask the grandparent to put us in our parent's place (the
            // parent then moves under us); failing that it may relocate a weaker leaf for us.
            let anc = self.ancestors();
            if anc.len() >= 2 {
                let g = anc[anc.len() - 2];
                if !self.avoided(g, now) {
                    self.send_join(g, JoinKind::Promote, Some(d - 2), self.up.parent, now);
                }
            }
        }
    }

    pub(super) fn maybe_relocate_for(&mut self, capacity: u16, now: Millis) {
        if self
            .down
            .last_relocate_at
            .is_some_and(|t| now.since(t) < RELOCATE_GAP_MS)
        {
            return;
        }
        let victim = self
            .down
            .children
            .iter()
            .filter(|(_, c)| !c.has_children && c.capacity < capacity)
            .min_by_key(|(id, c)| (c.capacity, **id))
            .map(|(id, _)| *id);
        if let Some(v) = victim {
            self.down.last_relocate_at = Some(now);
            self.send(v, TreeMsg::Relocate);
        }
    }

    /// Grant a promotion: the joiner, a child of our child `old` more capable than it, takes a
    /// slot beside `old` now (one over our capacity) and `old` moves under it make-before-break.
    pub(super) fn try_promote(&mut self, req: &JoinReq, now: Millis) -> bool {
        let Some(old) = req.lost_parent else {
            return false;
        };
        let c = req.joiner;
        let ok = req.hops == 0
            && self.up.path.is_some()
            && self.join.pending.is_none()
            && self.repair.orphan.is_none()
            && self.moves.promotion.is_none()
            && self.moves.held.is_none()
            && self
                .moves
                .last_promotion_at
                .is_none_or(|t| now.since(t) >= PROMOTION_GAP_MS)
            && self.down.children.len() <= self.capacity as usize
            && !self.down.children.contains_key(&c)
            && self.up.parent != Some(c)
            && !self.ancestors().contains(&c)
            && self
                .down
                .children
                .get(&old)
                .is_some_and(|o| o.kids.contains(&c) && o.capacity < req.capacity);
        if !ok {
            return false;
        }
        self.down.children.insert(
            c,
            ChildInfo {
                capacity: req.capacity,
                has_children: false,
                kids: Vec::new(),
                summary: Vec::new(),
            },
        );
        self.moves.promotion = Some(Promotion { old, new: c });
        self.timers
            .set(Timer::PromotionEnd, now.plus(PROMOTION_DEADLINE_MS));
        self.moves.last_promotion_at = Some(now);
        let parent = self.current_update(now);
        let directory = self.directory_for(c);
        self.send(c, TreeMsg::Accept { parent, directory });
        self.out.push(Output::AcceptChild { peer: c });
        self.emit(TreeEvent::ChildAdded(c));
        self.children_changed(now);
        true
    }

    /// `MoveUnder` from a child we lost to a promotion (target: that child) or from our parent
    /// (target: our new parent after its promotion).
    pub(super) fn on_move_under(&mut self, from: NodeId, target: NodeId, now: Millis) {
        let from_child = target == from && self.down.children.contains_key(&from);
        if !from_child && self.up.parent != Some(from) {
            return;
        }
        if from_child {
            self.out.push(Output::Disconnect { peer: from });
            self.remove_child(from, now);
            // Our other children go under the promoted peer too (it took our place and had room
            // for them when it asked): they keep their depth, we alone go one level down.
            let kids: Vec<NodeId> = self.down.children.keys().copied().collect();
            for k in kids {
                self.send(k, TreeMsg::MoveUnder { target });
            }
        }
        if target == self.id
            || self.is_root
            || self.join.pending.is_some()
            || self.repair.orphan.is_some()
            || self.up.path.is_none()
            || self.up.parent == Some(target)
            || self.in_own_subtree(target)
        {
            return;
        }
        // Bounded in depth so that stale paths cannot close a cycle: our promoted former child
        // is at our level (its subtree is deeper than the bound: never forwarded), any other
        // target must be strictly above us, and so must whatever slot it forwards us to (two
        // peers forwarded into each other's moving subtrees would close a loop otherwise).
        let Some(depth) = self.depth() else { return };
        let max_depth = if from_child {
            depth
        } else {
            depth.saturating_sub(1)
        };
        self.send_join(target, JoinKind::Move, Some(max_depth), None, now);
    }

    /// As promoted peer, just accepted by our grandparent: we hold our former parent's place
    /// and call it under us. If we have no free slot our least capable child takes the one we
    /// leave at the former parent (at its old depth), and the former parent's move waits for it.
    pub(super) fn call_former_parent_under(&mut self, former: NodeId, now: Millis) {
        self.send(former, TreeMsg::MoveUnder { target: self.id });
        self.moves.promoted_from = Some(former);
        self.timers
            .set(Timer::FormerParentWait, now.plus(PROMOTION_DEADLINE_MS));
        if self.free() == 0
            && let Some(k) = self
                .down
                .children
                .iter()
                .min_by_key(|(id, c)| (c.has_children, c.capacity, **id))
                .map(|(id, _)| *id)
        {
            self.send(k, TreeMsg::MoveUnder { target: former });
        }
    }

    /// The next rebalancing check after we attached somewhere: later after a move (stay put
    /// for a while), sooner after a repair that sank a relay more than one level (its subtree
    /// was dragged down), else as scheduled.
    pub(super) fn schedule_rebalance_after_join(
        &mut self,
        kind: JoinKind,
        sank: bool,
        now: Millis,
    ) {
        if kind.is_move() {
            self.moves.move_failures = 0;
            let at = now.plus(2 * self.rebalance_gap());
            self.timers.set(Timer::Rebalance, at);
        } else if sank {
            self.moves.move_failures = 0;
            let base = self.cfg.rebalance_interval_ms / 4;
            self.timers.set(
                Timer::Rebalance,
                now.plus(base + self.rng.below(base.max(1))),
            );
        } else if !self.timers.is_set(Timer::Rebalance) {
            let at = now.plus(self.rebalance_gap());
            self.timers.set(Timer::Rebalance, at);
        }
    }

    /// As grandparent: the promotion's overlap is over. The former parent did not move under
    /// the promoted peer in time: hand it over the hard way (its subtree has a short cut)
    /// rather than stay over capacity.
    pub(super) fn promotion_over(&mut self, now: Millis) {
        let Some(pr) = self.moves.promotion.take() else {
            return;
        };
        while self.down.children.len() > self.capacity as usize {
            let (victim, successor) = if self.down.children.contains_key(&pr.old) {
                (
                    pr.old,
                    self.down.children.contains_key(&pr.new).then_some(pr.new),
                )
            } else {
                (pr.new, None)
            };
            if !self.down.children.contains_key(&victim) {
                break;
            }
            self.send(victim, TreeMsg::Leave { successor });
            self.out.push(Output::Disconnect { peer: victim });
            self.remove_child(victim, now);
        }
    }

    /// As promoted peer: the former parent did not come; a move of it we held is refused.
    pub(super) fn former_parent_wait_over(&mut self) {
        self.moves.promoted_from = None;
        if let Some(h) = self.moves.held.take() {
            self.send(
                h.joiner,
                TreeMsg::Refuse {
                    reason: RefuseReason::Full,
                    hints: Vec::new(),
                },
            );
        }
    }
}
