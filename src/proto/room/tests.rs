//! The room layer's rules, each pinned down by a test of its own.

use super::*;
use crate::proto::tree::{Config, JoinKind, SlotAd};

fn id(b: u8) -> NodeId {
    NodeId([b; 32])
}

fn drain(r: &mut RoomNode) -> Vec<RoomOutput> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

fn root() -> RoomNode {
    RoomNode::new(
        TreeNode::new_root(id(1), Config::default(), 1),
        id(1),
        RoomTimings::default(),
    )
}

/// A first join request (the joiner is the sender).
fn join() -> TreeMsg {
    TreeMsg::Join {
        kind: JoinKind::New,
        capacity: 4,
        max_depth: None,
        lost_parent: None,
        joiner: None,
        hops: 0,
        parent_gone: false,
    }
}

/// Runs timers up to `until`, returning every output.
fn run_until(r: &mut RoomNode, until: Millis) -> Vec<RoomOutput> {
    let mut out = drain(r);
    for _ in 0..10_000 {
        match r.poll_timeout() {
            Some(t) if t <= until => {
                r.handle_timeout(t);
                out.extend(drain(r));
            }
            _ => break,
        }
    }
    out
}

fn downs(out: &[RoomOutput]) -> Vec<(NodeId, LinkCause)> {
    out.iter()
        .filter_map(|o| match o {
            RoomOutput::Emit(RoomEvent::LinkDown { peer, cause }) => Some((*peer, *cause)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_accepted_child_that_never_connects_is_dropped_after_the_deadline() {
    let mut r = root();
    r.handle_message(id(2), join(), Millis(0));
    r.handle_message(id(3), join(), Millis(0));
    let out = drain(&mut r);
    assert!(out.contains(&RoomOutput::AcceptChild { peer: id(2) }));
    assert!(out.contains(&RoomOutput::AcceptChild { peer: id(3) }));
    // Child 3 connects its media; child 2 never does.
    r.handle_child_connected(id(3), Millis(2_000));
    let out = run_until(&mut r, Millis(14_999));
    assert!(downs(&out).is_empty(), "{out:?}");
    assert_eq!(r.tree().child_count(), 2);
    let out = run_until(&mut r, Millis(15_000));
    assert_eq!(downs(&out), vec![(id(2), LinkCause::NeverConnected)]);
    assert!(out.contains(&RoomOutput::SendControl {
        to: id(2),
        msg: TreeMsg::Leave { successor: None }
    }));
    assert!(out.contains(&RoomOutput::Disconnect { peer: id(2) }));
    assert_eq!(r.tree().children().collect::<Vec<_>>(), vec![id(3)]);
    // Its slot is free again: a newcomer is accepted in its place.
    r.handle_message(id(4), join(), Millis(15_001));
    assert!(drain(&mut r).contains(&RoomOutput::AcceptChild { peer: id(4) }));
    // A child cut for being too slow is alive: told to go, and its slot freed.
    r.handle_child_connected(id(4), Millis(15_100));
    drain(&mut r);
    r.handle_child_too_slow(id(4), Millis(15_200));
    let out = drain(&mut r);
    assert_eq!(downs(&out), vec![(id(4), LinkCause::TooSlow)]);
    assert!(out.contains(&RoomOutput::SendControl {
        to: id(4),
        msg: TreeMsg::Leave { successor: None }
    }));
    assert_eq!(r.tree().children().collect::<Vec<_>>(), vec![id(3)]);
    // A late connection of the dropped child is closed again.
    r.handle_child_connected(id(2), Millis(16_000));
    assert_eq!(drain(&mut r), vec![RoomOutput::Disconnect { peer: id(2) }]);
}

#[test]
fn a_closed_connection_is_probed_before_the_link_is_declared_down() {
    let mut r = root();
    for c in [2, 3, 4] {
        r.handle_message(id(c), join(), Millis(0));
        r.handle_child_connected(id(c), Millis(100));
    }
    drain(&mut r);
    // Not a neighbour: nothing to probe.
    r.handle_peer_disconnected(id(9), Millis(1_000));
    assert!(drain(&mut r).is_empty());
    // 2 answers, 3 stays silent, 4 refuses the connection.
    for c in [2, 3, 4] {
        r.handle_peer_disconnected(id(c), Millis(1_000));
    }
    // A second close while probing does not probe twice.
    r.handle_peer_disconnected(id(2), Millis(1_001));
    let probes: Vec<_> = drain(&mut r)
        .into_iter()
        .filter(|o| matches!(o, RoomOutput::Probe { .. }))
        .collect();
    assert_eq!(probes.len(), 3);
    r.handle_probe_answered(id(2), Millis(1_100));
    assert_eq!(
        drain(&mut r),
        vec![RoomOutput::Emit(RoomEvent::ProbeAnswered(id(2)))]
    );
    r.handle_probe_failed(id(4), Millis(1_200));
    let refused = drain(&mut r);
    assert_eq!(downs(&refused), vec![(id(4), LinkCause::ProbeFailed)]);
    assert!(
        !refused
            .iter()
            .any(|o| matches!(o, RoomOutput::SendControl { .. })),
        "a peer that refused the connection is not written to: {refused:?}"
    );
    let out = run_until(&mut r, Millis(2_499));
    assert!(downs(&out).is_empty());
    let out = run_until(&mut r, Millis(2_500));
    assert_eq!(downs(&out), vec![(id(3), LinkCause::ProbeTimeout)]);
    // It may be alive and slow: told to go. The one that refused the connection is gone.
    let leave = |c: u8| RoomOutput::SendControl {
        to: id(c),
        msg: TreeMsg::Leave { successor: None },
    };
    assert!(out.contains(&leave(3)));
    assert_eq!(r.tree().children().collect::<Vec<_>>(), vec![id(2)]);
    // A late answer changes nothing.
    r.handle_probe_answered(id(3), Millis(3_000));
    assert!(drain(&mut r).is_empty());
}

/// A snapshot naming the root, with free slots.
fn root_slot() -> Snapshot {
    Snapshot {
        candidates: vec![SlotAd {
            peer: id(1),
            depth: 0,
            free: 2,
            capacity: 4,
        }],
    }
}

fn viewer() -> RoomNode {
    RoomNode::new(
        TreeNode::new(id(5), Config::default(), 5),
        id(1),
        RoomTimings::default(),
    )
}

#[test]
fn one_snapshot_request_in_flight_and_a_deadline_for_it() {
    let mut r = viewer();
    r.start(Millis(0));
    let out = drain(&mut r);
    assert!(out.contains(&RoomOutput::RequestSnapshot { from: id(1) }));
    // The tree retries every join timeout; no second request while one is out.
    let out = run_until(&mut r, Millis(5_999));
    assert!(
        !out.iter()
            .any(|o| matches!(o, RoomOutput::RequestSnapshot { .. })),
        "{out:?}"
    );
    // Unanswered after the deadline: counts as empty, and the next request goes out.
    let out = run_until(&mut r, Millis(7_500));
    assert!(out.contains(&RoomOutput::RequestSnapshot { from: id(1) }));
    // An answer clears it at once.
    r.handle_snapshot(root_slot(), Millis(7_600));
    let out = drain(&mut r);
    assert!(
        out.iter()
            .any(|o| matches!(o, RoomOutput::SendControl { to, .. } if *to == id(1)))
    );
}

fn attached_viewer() -> RoomNode {
    let mut r = viewer();
    r.start(Millis(0));
    r.handle_snapshot(root_slot(), Millis(10));
    drain(&mut r);
    let mut parent = TreeNode::new_root(id(1), Config::default(), 1);
    parent.handle_message(id(5), join(), Millis(20));
    let accept = std::iter::from_fn(|| parent.poll_output())
        .find_map(|o| match o {
            Output::Send { to, msg } if to == id(5) => Some(msg),
            _ => None,
        })
        .expect("the root accepts");
    r.handle_message(id(1), accept, Millis(30));
    assert_eq!(r.tree().parent(), Some(id(1)));
    r.handle_message(id(6), join(), Millis(40));
    r.handle_child_connected(id(6), Millis(50));
    drain(&mut r);
    r
}

#[test]
fn the_end_notice_is_forwarded_and_closes_the_room() {
    let mut r = attached_viewer();
    r.handle_end_notice(Millis(100));
    let out = drain(&mut r);
    assert_eq!(
        out[0],
        RoomOutput::Emit(RoomEvent::BroadcastEnded(EndCause::Notice))
    );
    assert_eq!(out[1], RoomOutput::SendEnd { to: vec![id(6)] });
    assert_eq!(out.last(), Some(&RoomOutput::Close));
    assert!(r.is_closed() && r.tree().has_left());
    assert_eq!(r.poll_timeout(), None);
    // Once only.
    r.handle_end_notice(Millis(200));
    assert!(drain(&mut r).is_empty());
}

#[test]
fn the_root_sends_the_end_notice_before_its_leave() {
    let mut r = root();
    r.handle_message(id(2), join(), Millis(0));
    drain(&mut r);
    r.handle_end_notice(Millis(10));
    assert!(
        drain(&mut r).is_empty(),
        "only the root's own leave ends it"
    );
    r.leave(Millis(20));
    let out = drain(&mut r);
    assert_eq!(out[0], RoomOutput::SendEnd { to: vec![id(2)] });
    let leave = out
        .iter()
        .position(|o| {
            matches!(
                o,
                RoomOutput::SendControl {
                    msg: TreeMsg::Leave { .. },
                    ..
                }
            )
        })
        .expect("a Leave to the child");
    assert!(leave > 0);
    assert_eq!(out.last(), Some(&RoomOutput::Close));
}

#[test]
fn an_orphan_checks_the_record_and_ends_when_it_says_so() {
    let mut r = attached_viewer();
    // The parent (the broadcaster) vanished without a word.
    r.handle_link_down(id(1), Millis(1_000));
    let out = drain(&mut r);
    assert_eq!(
        out.iter()
            .filter(|o| **o == RoomOutput::CheckRecord)
            .count(),
        1
    );
    // Still reachable as far as anyone knows: the repair goes on, checks repeat while
    // detached, one at a time.
    r.handle_record_checked(true, Millis(1_500));
    let out = run_until(&mut r, Millis(6_100));
    assert_eq!(
        out.iter()
            .filter(|o| **o == RoomOutput::CheckRecord)
            .count(),
        1,
        "{out:?}"
    );
    assert!(!r.is_closed());
    r.handle_record_checked(false, Millis(6_200));
    let out = drain(&mut r);
    assert_eq!(
        out[0],
        RoomOutput::Emit(RoomEvent::BroadcastEnded(EndCause::Record))
    );
    assert_eq!(out.last(), Some(&RoomOutput::Close));
}

#[test]
fn a_parent_whose_media_never_connects_is_left_and_not_asked_again() {
    // Attached to the root at 30 ms; its media connection never comes up.
    let mut r = attached_viewer();
    let out = run_until(&mut r, Millis(10_029));
    assert!(downs(&out).is_empty(), "{out:?}");
    let out = run_until(&mut r, Millis(10_030));
    assert_eq!(downs(&out), vec![(id(1), LinkCause::ParentNeverConnected)]);
    // The parent is told (it frees the slot now), and the half-open media session closes.
    assert!(out.contains(&RoomOutput::SendControl {
        to: id(1),
        msg: TreeMsg::Leave { successor: None }
    }));
    assert!(out.contains(&RoomOutput::Disconnect { peer: id(1) }));
    assert_eq!(r.tree().parent(), None);
    // Offered that parent and another one, it joins the other.
    let mut snap = root_slot();
    snap.candidates.push(SlotAd {
        peer: id(7),
        depth: 1,
        free: 2,
        capacity: 4,
    });
    r.handle_snapshot(snap, Millis(10_100));
    let out = run_until(&mut r, Millis(12_000));
    let joins: Vec<NodeId> = out
        .iter()
        .filter_map(|o| match o {
            RoomOutput::SendControl {
                to,
                msg: TreeMsg::Join { .. },
            } => Some(*to),
            _ => None,
        })
        .collect();
    assert!(joins.contains(&id(7)), "{out:?}");
    assert!(
        !joins.contains(&id(1)),
        "asked the unreachable parent again: {out:?}"
    );
}

#[test]
fn a_transport_failure_before_the_media_is_up_avoids_the_parent_without_accusing_it() {
    let mut r = attached_viewer();
    r.handle_link_down(id(1), Millis(2_000));
    let out = drain(&mut r);
    assert_eq!(downs(&out), vec![(id(1), LinkCause::ParentConnectFailed)]);
    // The repair's join to a grandparent (none here) would not carry `parent_gone`: nothing
    // says the parent is dead. Once connected, a transport failure is a lost parent as before.
    let mut r = attached_viewer();
    r.handle_parent_connected(id(1), Millis(500));
    let out = run_until(&mut r, Millis(30_000));
    assert!(downs(&out).is_empty(), "{out:?}");
    r.handle_link_down(id(1), Millis(30_001));
    assert_eq!(downs(&drain(&mut r)), vec![(id(1), LinkCause::Transport)]);
}
