//! The joiner's side: from a [`Snapshot`](super::Snapshot) to an accepted place, for a
//! newcomer and for every later move or repair that sends a join request.
//!
//! What it decides: which candidate to ask ([`TreeNode::pick`]: the two shallowest levels,
//! weighted by spare slots and RTT, so joiners holding the same directory spread out), how deep
//! a newcomer lets a full candidate pass it down (one level of slack for the first attempts),
//! how long to wait for an answer (short for a repair: the subtree has no stream meanwhile),
//! and what to do with an answer. A refusal or a silent target is forgotten for
//! `refuse_memory_ms` and removed from our copies of the hints and the directory (a stale
//! directory full of departed peers would loop forever); the retry waits a random jitter so
//! joiners refused together do not come back together. An accept is checked (no cycle, sane
//! path) before it becomes our parent; a late accept is released.

use std::collections::BTreeMap;

use super::super::{Millis, NodeId};
use super::slots::dedup_ads;
use super::timer::Timer;
use super::{
    DEPTH_DETACHED, JoinKind, MAX_ANCESTORS, MAX_SLOTS_IN, Output, Path, SlotAd, TreeEvent,
    TreeMsg, TreeNode, TreeUpdate,
};

/// Remembered refusal hints.
const MAX_HINTS: usize = 24;

/// First-join attempts that ask for a slot at most one level below the chosen candidate.
const NEW_BOUNDED_ATTEMPTS: u8 = 4;

/// Unreachable parents remembered at once; past it the one remembered the shortest goes.
pub(super) const MAX_UNREACHABLE: usize = 32;

/// The joiner's state.
#[derive(Debug, Default)]
pub(super) struct Joiner {
    /// [`TreeNode::start`] was called.
    pub(super) started: bool,
    /// We were attached once (later joins are repairs or moves).
    pub(super) joined_once: bool,
    /// The join request in flight (one at a time).
    pub(super) pending: Option<Pending>,
    /// Fresh candidates, newest first: from a snapshot or a refusal.
    pub(super) hints: Vec<SlotAd>,
    /// Candidates that refused or did not answer, not asked again until then.
    pub(super) refused: BTreeMap<NodeId, Millis>,
    /// Parents our media could not reach, avoided until then (kept apart from `refused`, whose
    /// short entries would overwrite these). At most [`MAX_UNREACHABLE`].
    pub(super) unreachable: BTreeMap<NodeId, Millis>,
    /// Measured RTTs (tie-break between candidates).
    pub(super) rtt: BTreeMap<NodeId, u32>,
    /// First-join attempts so far (the first few are bounded in depth).
    pub(super) new_attempts: u8,
    /// The root, named by a snapshot that knew no free slot.
    pub(super) root_hint: Option<NodeId>,
}

/// A join request in flight.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pending {
    pub(super) target: NodeId,
    pub(super) kind: JoinKind,
    pub(super) sent: Millis,
}

impl TreeNode {
    /// Our join request in flight, with its answer deadline.
    fn set_pending(&mut self, p: Pending) {
        self.join.pending = Some(p);
        self.arm_join_answer();
    }

    /// The join request in flight, now answered or abandoned.
    pub(super) fn take_pending(&mut self) -> Option<Pending> {
        self.timers.clear(Timer::JoinAnswer);
        self.join.pending.take()
    }

    /// The answer's deadline follows the request in flight (its kind and target).
    pub(super) fn arm_join_answer(&mut self) {
        match self.join.pending {
            Some(p) => self
                .timers
                .set(Timer::JoinAnswer, p.sent.plus(self.timeout_for(&p))),
            None => self.timers.clear(Timer::JoinAnswer),
        }
    }

    /// How long to wait for an answer to a join request: repairs are urgent (the subtree has no
    /// stream), and a target that does not answer quickly is most likely gone.
    fn timeout_for(&self, p: &Pending) -> u64 {
        match p.kind {
            JoinKind::Repair | JoinKind::Handover => {
                let rtt = self.join.rtt.get(&p.target).map_or(0, |r| 4 * *r as u64);
                self.cfg
                    .repair_timeout_ms
                    .max(rtt)
                    .min(self.cfg.join_timeout_ms)
            }
            JoinKind::New | JoinKind::Move | JoinKind::Promote => self.cfg.join_timeout_ms,
        }
    }

    /// Adopted: `from` is our parent now (make-before-break: the old one is left only now).
    pub(super) fn on_accept(
        &mut self,
        from: NodeId,
        upd: TreeUpdate,
        directory: Vec<SlotAd>,
        now: Millis,
    ) {
        // The answer may come from where a full target forwarded our request.
        let Some(p) = self.take_pending() else {
            // Stale (we timed out and went elsewhere): free the slot we were given.
            if self.up.parent != Some(from) {
                self.send(from, TreeMsg::Leave { successor: None });
            }
            return;
        };
        if !self.acceptable(from, &upd, p.kind) || self.unreachable(from, now) {
            self.send(from, TreeMsg::Leave { successor: None });
            self.join
                .refused
                .insert(from, now.plus(self.cfg.refuse_memory_ms));
            self.schedule_retry(now);
            return;
        }
        let old = self.up.parent;
        if let Some(o) = old.filter(|o| *o != from) {
            if p.kind == JoinKind::Promote {
                self.call_former_parent_under(o, now);
            } else {
                // Make-before-break: the new parent is in place, now leave the old one.
                self.send(o, TreeMsg::Leave { successor: None });
            }
            self.out.push(Output::Disconnect { peer: o });
        }
        self.up.parent = Some(from);
        self.up.parent_capacity = upd.capacity;
        self.up.parent_children = upd.children.len().min(u16::MAX as usize) as u16;
        if upd.depth == DEPTH_DETACHED {
            self.follow_detached_parent(from, old, now);
            return;
        }
        let mut ancestors = upd.ancestors;
        ancestors.push(from);
        let new_path = Path {
            depth: upd.depth.saturating_add(1),
            ancestors,
        };
        self.up.last_depth = new_path.depth;
        let depth = new_path.depth;
        self.up.path = Some(new_path);
        self.timers.clear(Timer::UpstreamGrace);
        self.join.hints.clear();
        let mut directory = directory;
        directory.truncate(MAX_SLOTS_IN);
        if !self.is_root {
            self.slots.directory = directory;
        }
        self.out.push(Output::ConnectParent { peer: from });
        if !self.join.joined_once {
            self.join.joined_once = true;
            self.emit(TreeEvent::Joined {
                parent: from,
                depth,
            });
        } else {
            self.emit(TreeEvent::ParentChanged { old, new: from });
        }
        // A relay repaired far below its old place (its own region was repairing too, or no
        // shallower slot answered in time) drags its subtree down: look for better soon.
        let sank = !self.down.children.is_empty()
            && self
                .repair
                .orphan
                .as_ref()
                .is_some_and(|o| depth > o.old_depth.saturating_add(1));
        if let Some(o) = self.repair.orphan.take() {
            self.emit(TreeEvent::Rejoined {
                parent: from,
                outage_ms: now.since(o.since),
            });
        }
        self.emit(TreeEvent::DepthChanged { depth: Some(depth) });
        // Children need the new path at once (cycle safety), the new parent our summary.
        self.publish_now(now);
        self.slots.last_summary_at = None;
        self.slots.last_summary.clear();
        self.summary_dirty(now);
        self.directory_changed(now);
        self.choose_backup(now);
        self.schedule_rebalance_after_join(p.kind, sank, now);
    }

    /// An accept we must not take: from a detached parent (but for a planned handover), with
    /// a path that is too long or contains us (a cycle), or about someone else.
    fn acceptable(&self, from: NodeId, upd: &TreeUpdate, kind: JoinKind) -> bool {
        !((upd.depth == DEPTH_DETACHED && kind != JoinKind::Handover)
            || upd.ancestors.len() >= MAX_ANCESTORS
            || upd.ancestors.contains(&self.id)
            || upd.peer != from)
    }

    /// Handed over to a sibling that is itself repairing: we follow it, detached, and get our
    /// path once it is attached (or repair ourselves after `upstream_grace_ms`).
    fn follow_detached_parent(&mut self, from: NodeId, old: Option<NodeId>, now: Millis) {
        self.up.path = None;
        self.timers
            .set(Timer::UpstreamGrace, now.plus(self.cfg.upstream_grace_ms));
        self.join.hints.clear();
        self.out.push(Output::ConnectParent { peer: from });
        self.emit(TreeEvent::ParentChanged { old, new: from });
        self.repair.orphan = None;
        self.publish_now(now);
    }

    pub(super) fn on_refuse(&mut self, from: NodeId, hints: Vec<SlotAd>, now: Millis) {
        if self.join.pending.is_none() {
            return;
        }
        let kind = self.join.pending.map(|p| p.kind);
        let until = now.plus(self.cfg.refuse_memory_ms);
        if let Some(p) = self.take_pending() {
            // Full, or it would not have forwarded.
            self.forget(p.target, until);
        }
        self.forget(from, until);
        for h in hints.into_iter().take(MAX_SLOTS_IN) {
            self.add_hint(h);
        }
        if !kind.is_some_and(JoinKind::is_move) {
            self.schedule_retry(now);
        } else {
            self.move_failed(now);
        }
    }

    pub(super) fn give_up_pending(&mut self, now: Millis) {
        if let Some(p) = self.take_pending() {
            self.forget(p.target, now.plus(self.cfg.refuse_memory_ms));
            if !p.kind.is_move() || self.repair.orphan.is_some() {
                self.timers.set(Timer::Retry, now);
            } else {
                self.move_failed(now);
            }
        }
    }

    /// A candidate refused or did not answer: not again for a while, and out of our copies of
    /// the directory and hints (else a stale directory full of departed peers loops forever;
    /// once empty we ask for a fresh snapshot).
    pub(super) fn forget(&mut self, peer: NodeId, until: Millis) {
        self.join.refused.insert(peer, until);
        self.join.hints.retain(|h| h.peer != peer);
        self.slots.directory.retain(|h| h.peer != peer);
    }

    fn schedule_retry(&mut self, now: Millis) {
        let jitter = self.rng.below(self.cfg.retry_jitter_ms.max(1));
        self.timers.set(Timer::Retry, now.plus(jitter));
    }

    pub(super) fn add_hint(&mut self, ad: SlotAd) {
        if ad.peer == self.id || ad.free == 0 || ad.depth == DEPTH_DETACHED {
            return;
        }
        self.join.hints.retain(|h| h.peer != ad.peer);
        self.join.hints.insert(0, ad);
        self.join.hints.truncate(MAX_HINTS);
    }

    /// Peers known to be in our own subtree (children and what their summaries name).
    pub(super) fn in_own_subtree(&self, peer: NodeId) -> bool {
        self.down.children.contains_key(&peer)
            || self
                .down
                .children
                .values()
                .any(|c| c.summary.iter().any(|a| a.peer == peer))
    }

    pub(super) fn usable(&self, ad: &SlotAd, now: Millis) -> bool {
        ad.peer != self.id
            && ad.free > 0
            && ad.depth != DEPTH_DETACHED
            && Some(ad.peer) != self.up.parent
            && self
                .repair
                .orphan
                .as_ref()
                .is_none_or(|o| o.lost != Some(ad.peer))
            && !self.avoided(ad.peer, now)
            && !self.in_own_subtree(ad.peer)
    }

    /// Usable candidates: the hints (fresh: from a snapshot or a refusal) if any, else the
    /// directory (older, often stale at the top).
    pub(super) fn candidates(&self, now: Millis) -> Vec<SlotAd> {
        let mut v: Vec<SlotAd> = self
            .join
            .hints
            .iter()
            .filter(|a| self.usable(a, now))
            .copied()
            .collect();
        if v.is_empty() {
            v = self
                .slots
                .directory
                .iter()
                .filter(|a| self.usable(a, now))
                .copied()
                .collect();
        }
        dedup_ads(&mut v);
        v
    }

    /// Join rule: smallest depth first. Among the candidates of that depth the choice is random,
    /// weighted by spare slots and by RTT: the tie-breaks of the design (spare capacity, then
    /// RTT) as preferences rather than absolutes, so that joiners holding the same directory
    /// do not all race for one slot.
    pub(super) fn pick(&mut self, cands: &[SlotAd]) -> Option<SlotAd> {
        let min = cands.iter().map(|a| a.depth).min()?;
        let weights: Vec<(SlotAd, u64)> = cands
            .iter()
            .filter(|a| a.depth <= min.saturating_add(1))
            .map(|a| {
                let rtt = self.join.rtt.get(&a.peer).copied().unwrap_or(100).max(1) as u64;
                let near = if a.depth == min { 2 } else { 1 };
                (*a, (a.free as u64 * near * 1_000_000) / rtt)
            })
            .collect();
        let total: u64 = weights.iter().map(|(_, w)| *w).sum();
        let mut r = self.rng.below(total.max(1));
        for (a, w) in &weights {
            if r < *w {
                return Some(*a);
            }
            r -= w;
        }
        weights.first().map(|(a, _)| *a)
    }

    /// Ask for a place if we need one and have no request in flight: a repair when orphaned,
    /// else a first join (an attached node moves through `rebalance`).
    pub(super) fn attempt_join(&mut self, now: Millis) {
        if self.left || self.join.pending.is_some() || self.is_root {
            return;
        }
        self.join.refused.retain(|_, t| *t > now);
        self.join.unreachable.retain(|_, t| *t > now);
        if let Some(o) = self.repair.orphan.clone() {
            self.attempt_repair(&o, now);
        } else if !self.join.joined_once {
            self.attempt_first_join(now);
        }
    }

    fn attempt_first_join(&mut self, now: Millis) {
        let cands = self.candidates(now);
        match self.pick(&cands) {
            None if let Some(r) = self.starved_root(now) => {
                // Nobody has a free slot (a starved room): ask the root, which makes room for a
                // peer that can relay.
                self.send_join(r, JoinKind::New, None, None, now)
            }
            Some(a) => {
                // A full target passes the request down its subtree, whose shallowest free slot
                // may be far deeper than what we know elsewhere: allow one level of slack, and
                // drop the bound after a few refusals (we must land somewhere).
                self.join.new_attempts = self.join.new_attempts.saturating_add(1);
                let slack =
                    1 + (self.join.new_attempts.saturating_sub(1) / NEW_BOUNDED_ATTEMPTS) as u16;
                let bound = (self.join.new_attempts <= 3 * NEW_BOUNDED_ATTEMPTS)
                    .then(|| a.depth.saturating_add(slack));
                self.send_join(a.peer, JoinKind::New, bound, None, now)
            }
            None => self.need_snapshot(now),
        }
    }

    /// The root, named by a snapshot that knew no free slot, if we can relay (a starved root
    /// makes room only for a peer that can) and it has not refused us lately.
    pub(super) fn starved_root(&self, now: Millis) -> Option<NodeId> {
        if self.capacity == 0 {
            return None;
        }
        self.join.root_hint.filter(|r| !self.avoided(*r, now))
    }

    /// Not to be asked now: it refused us lately, or our media cannot reach it.
    pub(super) fn avoided(&self, peer: NodeId, now: Millis) -> bool {
        self.join.refused.get(&peer).is_some_and(|t| *t > now) || self.unreachable(peer, now)
    }

    /// Our media could not reach it lately.
    pub(super) fn unreachable(&self, peer: NodeId, now: Millis) -> bool {
        self.join.unreachable.get(&peer).is_some_and(|t| *t > now)
    }

    /// Remember that our media cannot reach `peer` until `until` (bounded).
    pub(super) fn remember_unreachable(&mut self, peer: NodeId, until: Millis, now: Millis) {
        self.join.unreachable.retain(|_, t| *t > now);
        if self.join.unreachable.len() >= MAX_UNREACHABLE
            && !self.join.unreachable.contains_key(&peer)
            && let Some(first) = self
                .join
                .unreachable
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(p, _)| *p)
        {
            self.join.unreachable.remove(&first);
        }
        self.join.unreachable.insert(peer, until);
    }

    pub(super) fn need_snapshot(&mut self, now: Millis) {
        self.out.push(Output::RequestSnapshot);
        self.timers
            .set(Timer::Retry, now.plus(self.cfg.join_timeout_ms));
    }

    pub(super) fn send_join(
        &mut self,
        target: NodeId,
        kind: JoinKind,
        max_depth: Option<u16>,
        lost_parent: Option<NodeId>,
        now: Millis,
    ) {
        self.set_pending(Pending {
            target,
            kind,
            sent: now,
        });
        let parent_gone = kind == JoinKind::Repair
            && lost_parent.is_some()
            && self
                .repair
                .orphan
                .as_ref()
                .is_some_and(|o| o.link_down && o.lost == lost_parent);
        self.send(
            target,
            TreeMsg::Join {
                kind,
                capacity: self.capacity,
                max_depth,
                lost_parent,
                joiner: None,
                hops: 0,
                parent_gone,
            },
        );
    }
}
