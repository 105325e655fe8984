//! Timers as data: one [`Timer`] per kind of deadline, one [`TimerTable`] holding them.
//!
//! A deadline is not a field of its own but an entry in the table, so the earliest one
//! ([`TimerTable::next`], what [`TreeNode::poll_timeout`](super::TreeNode::poll_timeout)
//! returns) and the ones that expired are found in one place, and a new rule that needs a
//! deadline adds a variant rather than a field and two more branches. Each timer has at most
//! one deadline: setting it again replaces the old one (quinn-proto's `TimerTable` works the
//! same way).
//!
//! [`TreeNode::handle_timeout`](super::TreeNode::handle_timeout) serves the expired timers in
//! the order of [`Timer::ALL`]. That order is part of the behaviour: a handler may set or clear
//! a later timer (an unanswered join schedules an immediate retry, served in the same call), and
//! the seeded random draws happen in this order.

use super::super::Millis;

/// A deadline of the tree state machine, named after what happens when it passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Timer {
    /// Our join request got no answer in time: the target counts as refusing.
    JoinAnswer,
    /// Publish our coalesced update (only our children changed since the last one).
    Publish,
    /// Send our summary to our parent (the root: refresh the directory).
    Summary,
    /// Send the directory to our children.
    Directory,
    /// Detached upstream for longer than `upstream_grace_ms`: repair ourselves.
    UpstreamGrace,
    /// Ask for a place again (after a refusal's jitter, a snapshot request, or the settle time
    /// of a repair).
    Retry,
    /// Look for a better place (rebalancing).
    Rebalance,
    /// As grandparent: the overlap of a promotion is over; hand the former parent over if it
    /// has not moved.
    PromotionEnd,
    /// As promoted peer: stop waiting for the former parent to move under us.
    FormerParentWait,
}

impl Timer {
    /// Every timer, in the order expired ones are served.
    pub const ALL: [Timer; 9] = [
        Timer::JoinAnswer,
        Timer::Publish,
        Timer::Summary,
        Timer::Directory,
        Timer::UpstreamGrace,
        Timer::Retry,
        Timer::Rebalance,
        Timer::PromotionEnd,
        Timer::FormerParentWait,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// The deadline of each [`Timer`], if set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct TimerTable {
    at: [Option<Millis>; Timer::ALL.len()],
}

impl TimerTable {
    /// Set `timer` to fire at `at` (replaces an earlier setting).
    pub(super) fn set(&mut self, timer: Timer, at: Millis) {
        self.at[timer.index()] = Some(at);
    }

    /// Cancel `timer`.
    pub(super) fn clear(&mut self, timer: Timer) {
        self.at[timer.index()] = None;
    }

    /// When `timer` fires, if set.
    pub(super) fn get(&self, timer: Timer) -> Option<Millis> {
        self.at[timer.index()]
    }

    /// Whether `timer` is set.
    pub(super) fn is_set(&self, timer: Timer) -> bool {
        self.get(timer).is_some()
    }

    /// The earliest deadline of all.
    pub(super) fn next(&self) -> Option<Millis> {
        self.at.iter().flatten().min().copied()
    }

    /// If `timer` has expired at `now`, clear it and say so.
    pub(super) fn take_expired(&mut self, timer: Timer, now: Millis) -> bool {
        let expired = self.get(timer).is_some_and(|t| now >= t);
        if expired {
            self.clear(timer);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_one_deadline_per_timer_and_finds_the_earliest() {
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.set(Timer::Rebalance, Millis(50));
        t.set(Timer::Retry, Millis(30));
        t.set(Timer::Retry, Millis(40));
        assert_eq!(t.get(Timer::Retry), Some(Millis(40)), "set replaces");
        assert_eq!(t.next(), Some(Millis(40)));
        assert!(!t.take_expired(Timer::Retry, Millis(39)));
        assert!(t.take_expired(Timer::Retry, Millis(40)));
        assert!(!t.is_set(Timer::Retry), "served once");
        assert!(!t.take_expired(Timer::Retry, Millis(41)));
        assert_eq!(t.next(), Some(Millis(50)));
        t.clear(Timer::Rebalance);
        assert_eq!(t.next(), None);
    }

    #[test]
    fn all_lists_every_timer_once_in_declaration_order() {
        for (i, t) in Timer::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
        }
    }
}
