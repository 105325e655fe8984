//! The end of a room: leaving, the broadcaster's end notice, and the room-record check of an
//! orphan (see the module docs of [`super`]).
//!
//! The root's leave sends the end notice before its Leave messages, so children learn that the
//! broadcast is over rather than repair toward a root that is gone. A viewer forwards a verified
//! notice to its children and closes; an orphan that cannot reach the root asks the shell to read
//! the room record, the fallback when no notice reached it.

use super::super::{Millis, NodeId};
use super::timer::{RoomTimer, TimerTable};
use super::{EndCause, RoomEvent, RoomNode, RoomOutput};

impl RoomNode {
    /// The shell verified the broadcaster's end notice (signer, room, session). The root
    /// ignores it (only its own leave ends its broadcast).
    pub fn handle_end_notice(&mut self, now: Millis) {
        if self.closed || self.tree.is_root() {
            return;
        }
        self.end(EndCause::Notice, now);
    }

    /// The answer to [`RoomOutput::CheckRecord`]: `live` unless the record says the broadcast
    /// ended (an unreachable record counts as live: the tree's repair goes on).
    pub fn handle_record_checked(&mut self, live: bool, now: Millis) {
        self.record_check_inflight = false;
        if self.closed || live || self.tree.is_root() {
            return;
        }
        self.end(EndCause::Record, now);
    }

    /// The shell found the broadcaster gone (its media silent and the broadcaster itself
    /// unreachable for a grace period): the room ends as for a notice, with
    /// [`EndCause::BroadcasterLost`]. The root ignores it.
    pub fn handle_broadcaster_lost(&mut self, now: Millis) {
        if self.closed || self.tree.is_root() {
            return;
        }
        self.end(EndCause::BroadcasterLost, now);
    }

    /// Leave: at the root, the end notice goes to the children before the Leave messages.
    pub fn leave(&mut self, now: Millis) {
        if self.closed {
            return;
        }
        if self.tree.is_root() {
            let to: Vec<NodeId> = self.tree.children().collect();
            self.out.push_back(RoomOutput::SendEnd { to });
        }
        self.close(now);
    }

    fn end(&mut self, cause: EndCause, now: Millis) {
        self.emit(RoomEvent::BroadcastEnded(cause));
        let to: Vec<NodeId> = self.tree.children().collect();
        if !to.is_empty() {
            self.out.push_back(RoomOutput::SendEnd { to });
        }
        self.close(now);
    }

    fn close(&mut self, now: Millis) {
        self.tree.leave(now);
        self.pump(now);
        self.closed = true;
        self.timers = TimerTable::default();
        self.media_up.clear();
        self.out.push_back(RoomOutput::Close);
    }

    pub(super) fn check_record(&mut self, now: Millis) {
        if !self.record_check_inflight {
            self.record_check_inflight = true;
            self.out.push_back(RoomOutput::CheckRecord);
        }
        self.timers.set(
            RoomTimer::RecordCheck,
            now.plus(self.timings.record_check_ms),
        );
    }
}
