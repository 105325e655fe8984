//! Free-slot knowledge: summaries up the tree, directories down, snapshots for newcomers.
//!
//! What it decides: what a node tells its parent (the best free slots of its subtree, at most
//! every `summary_interval`, only when changed, shorter and rarer the more slots the parent
//! has, so that all its children together stay within `summary_budget_bytes_per_sec`), what it
//! tells each child (the shallowest two levels of what it knows, shuffled per child and never
//! the child's own subtree, so the room's joins spread over many nearly-as-good slots and no
//! join can close a cycle), and what it hands a newcomer (its subtree's and its directory's
//! best slots; the root, with no free slot, when it knows none). The root's summary of
//! everything is the directory of the whole tree.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::super::{Millis, NodeId};
use super::timer::Timer;
use super::{MAX_SLOTS_IN, SlotAd, Snapshot, TreeMsg, TreeNode};

/// What we know of free slots, and what we last told about ours.
#[derive(Debug, Default)]
pub(super) struct SlotState {
    /// The best free slots of the tree, from our parent (the root: its own summary).
    pub(super) directory: Vec<SlotAd>,
    /// The summary we last sent to our parent, and when.
    pub(super) last_summary: Vec<SlotAd>,
    pub(super) last_summary_at: Option<Millis>,
    /// When we last sent the directory to our children.
    pub(super) last_dir_at: Option<Millis>,
}

impl TreeNode {
    /// A child's summary of its subtree (from anyone else: ignored).
    pub(super) fn on_summary(&mut self, from: NodeId, mut slots: Vec<SlotAd>, now: Millis) {
        if let Some(c) = self.down.children.get_mut(&from) {
            slots.truncate(MAX_SLOTS_IN);
            c.summary = slots;
            self.summary_dirty(now);
        }
    }

    /// Our parent's directory (from anyone else: ignored; the root makes its own).
    pub(super) fn on_directory(&mut self, from: NodeId, mut slots: Vec<SlotAd>, now: Millis) {
        if self.up.parent == Some(from) && !self.is_root {
            slots.truncate(MAX_SLOTS_IN);
            if slots != self.slots.directory {
                self.slots.directory = slots;
                self.directory_changed(now);
            }
        }
    }

    /// The best candidates we know for a newcomer: our subtree's free slots and the directory,
    /// shallowest first, at most `max`.
    pub fn snapshot_for_newcomer(&self, max: usize) -> Snapshot {
        let mut all = self.compute_summary(self.cfg.directory_len.max(max));
        all.extend(self.slots.directory.iter().copied());
        sort_ads(&mut all);
        dedup_ads(&mut all);
        all.retain(|a| a.free > 0);
        all.truncate(max);
        if all.is_empty() && self.depth().is_some() {
            // We know no free slot anywhere: name the root (free 0) so the newcomer has someone
            // to ask; a starved root makes room for a peer that can relay.
            let root = self.ancestors().first().copied().unwrap_or(self.id);
            all.push(SlotAd {
                peer: root,
                depth: 0,
                free: 0,
                capacity: 0,
            });
        }
        Snapshot { candidates: all }
    }

    pub(super) fn compute_summary(&self, len: usize) -> Vec<SlotAd> {
        let Some(depth) = self.depth() else {
            return Vec::new();
        };
        let mut v = Vec::with_capacity(1 + self.down.children.len() * self.cfg.summary_len);
        let free = self.free();
        if free > 0 {
            v.push(SlotAd {
                peer: self.id,
                depth,
                free,
                capacity: self.capacity,
            });
        }
        for c in self.down.children.values() {
            v.extend(c.summary.iter().filter(|a| a.depth > depth).copied());
        }
        sort_ads(&mut v);
        dedup_ads(&mut v);
        v.truncate(len);
        v
    }

    pub(super) fn summary_dirty(&mut self, now: Millis) {
        if !self.timers.is_set(Timer::Summary) {
            let at = match self.slots.last_summary_at {
                Some(t) => t.plus(self.summary_gap()).max(now),
                None => now,
            };
            self.timers.set(Timer::Summary, at);
        }
    }

    /// Entries in our summary: the parent keeps only the best `summary_len` of all its children's,
    /// so the more children it has, the fewer each needs to send (at least 2, for forwarding).
    pub(super) fn summary_entries(&self) -> usize {
        let c = (self.up.parent_capacity as usize).max(1);
        (self.cfg.summary_len * 4)
            .div_ceil(c)
            .clamp(2, self.cfg.summary_len.max(2))
    }

    /// Minimum gap between two summaries: the configured interval, stretched so that all the
    /// children of our parent together stay within its byte budget.
    pub(super) fn summary_gap(&self) -> u64 {
        let base = self.cfg.summary_interval_ms;
        let budget = self.cfg.summary_budget_bytes_per_sec as u64;
        if budget == 0 {
            return base;
        }
        let len = TreeMsg::Summary {
            slots: self.slots.last_summary.clone(),
        }
        .wire_len() as u64;
        let share = (self.up.parent_capacity as u64).max(1);
        base.max(len * share * 1000 / budget)
    }

    pub(super) fn flush_summary(&mut self, now: Millis) {
        self.timers.clear(Timer::Summary);
        if self.is_root {
            let dir = self.compute_summary(self.cfg.directory_len);
            if dir != self.slots.directory {
                self.slots.directory = dir;
                self.directory_changed(now);
            }
            return;
        }
        let Some(p) = self.up.parent else { return };
        let s = self.compute_summary(self.summary_entries());
        if s != self.slots.last_summary {
            self.slots.last_summary = s.clone();
            self.slots.last_summary_at = Some(now);
            self.send(p, TreeMsg::Summary { slots: s });
        }
    }

    /// The directory for one child (or joiner): the shallowest band (two levels) of what we know
    /// -- our own directory and our subtree's free slots -- shuffled per recipient, then the
    /// rest by depth. Every member holding the same few shallowest entries would send the whole
    /// room's joins and moves to them; different subsets per edge spread that load over the
    /// many slots that are nearly as good, and mix in nearby slots the farther down the tree.
    pub(super) fn directory_for(&mut self, to: NodeId) -> Vec<SlotAd> {
        // Never slots of the recipient's own subtree: it cannot tell them all from others (its
        // view of its subtree is its children's short summaries) and joining one, on stale
        // paths, would close a cycle. By induction the directory we received has none of our
        // subtree's slots; the root's own directory is its summary of everything, so it uses
        // only the other children's summaries.
        let mut pool = if self.is_root {
            Vec::new()
        } else {
            self.slots.directory.clone()
        };
        if let Some(d) = self.depth() {
            let free = self.free();
            if free > 0 {
                pool.push(SlotAd {
                    peer: self.id,
                    depth: d,
                    free,
                    capacity: self.capacity,
                });
            }
            for (c, info) in &self.down.children {
                if *c != to {
                    pool.extend(info.summary.iter().filter(|a| a.depth > d).copied());
                }
            }
        }
        pool.retain(|a| a.peer != to && a.free > 0);
        sort_ads(&mut pool);
        dedup_ads(&mut pool);
        let Some(min) = pool.first().map(|a| a.depth) else {
            return pool;
        };
        let band = pool
            .iter()
            .position(|a| a.depth > min.saturating_add(1))
            .unwrap_or(pool.len());
        for i in 0..band.saturating_sub(1) {
            let j = i + self.rng.below((band - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(self.cfg.directory_len);
        sort_ads(&mut pool);
        pool
    }

    pub(super) fn directory_changed(&mut self, now: Millis) {
        if !self.down.children.is_empty() && !self.timers.is_set(Timer::Directory) {
            let at = match self.slots.last_dir_at {
                Some(t) => t.plus(self.cfg.directory_interval_ms).max(now),
                None => now,
            };
            self.timers.set(Timer::Directory, at);
        }
        let backup_ok = self.repair.backup.is_some_and(|b| {
            self.slots
                .directory
                .iter()
                .chain(self.join.hints.iter())
                .any(|a| a.peer == b && self.usable(a, now))
        });
        if !backup_ok {
            self.choose_backup(now);
        }
    }

    pub(super) fn flush_directory(&mut self, now: Millis) {
        self.timers.clear(Timer::Directory);
        self.slots.last_dir_at = Some(now);
        let kids: Vec<NodeId> = self.down.children.keys().copied().collect();
        for c in kids {
            let slots = self.directory_for(c);
            self.send(c, TreeMsg::Directory { slots });
        }
    }
}

fn sort_ads(v: &mut [SlotAd]) {
    v.sort_by_key(|a| (a.depth, Reverse(a.free), Reverse(a.capacity), a.peer));
}

/// Keeps the first entry of each peer.
pub(super) fn dedup_ads(v: &mut Vec<SlotAd>) {
    let mut seen = BTreeSet::new();
    v.retain(|a| seen.insert(a.peer));
}
