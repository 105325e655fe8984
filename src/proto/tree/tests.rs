//! Unit tests of the tree state machine.

use std::collections::BTreeSet;

use super::rebalance::PROMOTION_DEADLINE_MS;
use super::repair::{CYCLE_GUARD_MS, Orphan};
use super::*;

fn id(n: u8) -> NodeId {
    NodeId([n; 32])
}

fn cfg(cap: u16) -> Config {
    Config {
        max_children: Some(cap),
        ..Config::default()
    }
}

fn drain(n: &mut TreeNode) -> Vec<Output> {
    std::iter::from_fn(|| n.poll_output()).collect()
}

fn sent(out: &[Output]) -> Vec<(NodeId, TreeMsg)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send { to, msg } => Some((*to, msg.clone())),
            _ => None,
        })
        .collect()
}

fn ad(n: u8, depth: u16, free: u16) -> SlotAd {
    SlotAd {
        peer: id(n),
        depth,
        free,
        capacity: 4,
    }
}

fn join_msg(kind: JoinKind) -> TreeMsg {
    join_req(kind, 4, None, None)
}
/// A join request as the joiner sends it (not forwarded).
fn join_req(
    kind: JoinKind,
    capacity: u16,
    max_depth: Option<u16>,
    lost_parent: Option<NodeId>,
) -> TreeMsg {
    TreeMsg::Join {
        kind,
        capacity,
        max_depth,
        lost_parent,
        joiner: None,
        hops: 0,
        parent_gone: false,
    }
}

/// The same request, claiming the link to the lost parent went down.
fn gone(mut m: TreeMsg) -> TreeMsg {
    if let TreeMsg::Join { parent_gone, .. } = &mut m {
        *parent_gone = true;
    }
    m
}

/// A relay at depth 3 (one child) under 2, whose directory knows nothing shallower than
/// depth 6: on losing its parent, the grandparent is the one to ask.
fn relay_with_a_deep_directory() -> TreeNode {
    let mut n = attached(5, 2, &[0, 1], 4);
    n.handle_message(id(7), join_msg(JoinKind::New), Millis(1));
    n.handle_message(
        id(2),
        TreeMsg::Directory {
            slots: vec![ad(60, 6, 2)],
        },
        Millis(2),
    );
    drain(&mut n);
    n
}

/// A viewer attached under `parent` (whose path is `ancestors` + parent at `depth - 1`).
fn attached(me: u8, parent: u8, ancestors: &[u8], cap: u16) -> TreeNode {
    let mut n = TreeNode::new(id(me), cfg(cap), me as u64);
    let t = Millis(0);
    n.start(t);
    n.handle_snapshot(
        Snapshot {
            candidates: vec![ad(parent, ancestors.len() as u16, 1)],
        },
        t,
    );
    let upd = TreeUpdate {
        peer: id(parent),
        parent: ancestors.last().map(|a| id(*a)),
        depth: ancestors.len() as u16,
        ancestors: ancestors.iter().map(|a| id(*a)).collect(),
        children: vec![id(me)],
        capacity: 4,
        uplink_kbps: 0,
        seq: 1,
        ts_ms: 0,
    };
    n.handle_message(
        id(parent),
        TreeMsg::Accept {
            parent: upd,
            directory: vec![ad(50, 1, 2), ad(51, 1, 3)],
        },
        t,
    );
    drain(&mut n);
    n
}

#[test]
fn capacity_configured_or_measured() {
    assert_eq!(cfg(3).capacity(), 3);
    let measured = Config {
        max_children: None,
        uplink_kbps: 5_500,
        stream_kbps: 1_000,
        ..Config::default()
    };
    assert_eq!(measured.capacity(), 5);
    let slow = Config {
        max_children: None,
        uplink_kbps: 800,
        stream_kbps: 1_000,
        ..Config::default()
    };
    assert_eq!(
        slow.capacity(),
        0,
        "less than one stream of uplink: leaf only"
    );
}

#[test]
fn join_picks_among_the_two_shallowest_levels_and_bounds_the_depth() {
    let mut seen = BTreeSet::new();
    for seed in 0..200 {
        let mut n = TreeNode::new(id(9), cfg(4), seed);
        n.start(Millis(0));
        assert!(drain(&mut n).contains(&Output::RequestSnapshot));
        n.handle_snapshot(
            Snapshot {
                candidates: vec![ad(3, 3, 4), ad(1, 1, 1), ad(2, 2, 4), ad(4, 1, 0)],
            },
            Millis(10),
        );
        let s = sent(&drain(&mut n));
        assert_eq!(s.len(), 1);
        let (to, msg) = &s[0];
        assert!(
            *to == id(1) || *to == id(2),
            "never deeper than the shallowest level + 1, never a full one"
        );
        let depth = if *to == id(1) { 1 } else { 2 };
        let TreeMsg::Join { max_depth, .. } = msg else {
            panic!("{msg:?}")
        };
        assert_eq!(
            *max_depth,
            Some(depth + 1),
            "a full target may pass it one level down, no more"
        );
        seen.insert(*to);
    }
    assert_eq!(seen.len(), 2, "spread over both levels");
}

#[test]
fn a_parent_that_knows_no_free_slot_hands_a_leaf_only_child_to_a_peer_that_can_relay() {
    let mut root = TreeNode::new_root(id(0), cfg(1), 5);
    let leaf_join = join_req(JoinKind::New, 0, None, None);
    root.handle_message(id(2), leaf_join, Millis(0));
    drain(&mut root);
    let repair = join_req(JoinKind::Repair, 4, Some(1), Some(id(7)));
    // A newcomer that cannot relay is refused: making room for it gains nothing.
    let leaf_join2 = join_req(JoinKind::New, 0, None, None);
    root.handle_message(id(6), leaf_join2, Millis(1));
    let s = sent(&drain(&mut root));
    assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
    // And a member that knows no free slot names the root to a newcomer.
    let snap = root.snapshot_for_newcomer(8);
    assert_eq!(snap.candidates.len(), 1);
    assert_eq!(
        (snap.candidates[0].peer, snap.candidates[0].free),
        (id(0), 0)
    );
    root.handle_message(id(5), repair.clone(), Millis(2));
    let s = sent(&drain(&mut root));
    assert!(s.contains(&(
        id(2),
        TreeMsg::Leave {
            successor: Some(id(5))
        }
    )));
    assert!(
        s.iter()
            .any(|(to, m)| *to == id(5) && matches!(m, TreeMsg::Accept { .. }))
    );
    assert_eq!(root.children().collect::<Vec<_>>(), vec![id(5)]);
    assert!(root.child_count() <= root.capacity() as usize);
    // An equally capable child is never preempted.
    let mut root = TreeNode::new_root(id(0), cfg(1), 5);
    root.handle_message(id(3), join_msg(JoinKind::New), Millis(0));
    drain(&mut root);
    root.handle_message(id(5), repair, Millis(2));
    let s = sent(&drain(&mut root));
    assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
}

/// Starved: a less capable relay child is handed over too (with its subtree); with no weaker
/// child, the request goes down to a relay child, which may have one.
#[test]
fn a_starved_parent_hands_over_a_weaker_relay_or_passes_the_request_down() {
    let relay_update = |cap: u16| TreeUpdate {
        capacity: cap,
        ..update_of(3, 0, &[4])
    };
    let repair = join_req(JoinKind::Repair, 4, None, Some(id(7)));
    let mut root = TreeNode::new_root(id(0), cfg(1), 5);
    root.handle_message(id(3), join_req(JoinKind::New, 1, None, None), Millis(0));
    root.handle_update(id(3), relay_update(1), Millis(0));
    drain(&mut root);
    root.handle_message(id(5), repair.clone(), Millis(1));
    let s = sent(&drain(&mut root));
    assert!(s.contains(&(
        id(3),
        TreeMsg::Leave {
            successor: Some(id(5))
        }
    )));
    assert_eq!(root.children().collect::<Vec<_>>(), vec![id(5)]);

    let mut root = TreeNode::new_root(id(0), cfg(1), 5);
    root.handle_message(id(3), join_req(JoinKind::New, 4, None, None), Millis(0));
    root.handle_update(id(3), relay_update(4), Millis(0));
    drain(&mut root);
    root.handle_message(id(5), repair, Millis(1));
    let s = sent(&drain(&mut root));
    assert_eq!(
        s,
        vec![(
            id(3),
            TreeMsg::Join {
                kind: JoinKind::Repair,
                capacity: 4,
                max_depth: None,
                lost_parent: Some(id(7)),
                joiner: Some(id(5)),
                hops: 1,
                parent_gone: false,
            }
        )]
    );
    assert_eq!(root.children().collect::<Vec<_>>(), vec![id(3)]);
}

/// A grandparent puts a child's more capable child in the child's place: one over capacity
/// until the former parent has moved under it, or the deadline hands it over.
#[test]
fn a_grandparent_grants_a_promotion_for_a_bounded_overlap() {
    let setup = || {
        let mut g = TreeNode::new_root(id(0), cfg(2), 9);
        g.handle_message(id(1), join_req(JoinKind::New, 2, None, None), Millis(0));
        g.handle_message(id(3), join_req(JoinKind::New, 4, None, None), Millis(0));
        g.handle_update(
            id(1),
            TreeUpdate {
                capacity: 2,
                ..update_of(1, 0, &[2])
            },
            Millis(0),
        );
        drain(&mut g);
        g
    };
    let promote = join_req(JoinKind::Promote, 8, Some(0), Some(id(1)));

    let mut g = setup();
    g.handle_message(id(2), promote.clone(), Millis(10));
    let s = sent(&drain(&mut g));
    assert!(
        s.iter()
            .any(|(to, m)| *to == id(2) && matches!(m, TreeMsg::Accept { .. })),
        "{s:?}"
    );
    assert_eq!(g.child_count(), 3);
    assert_eq!(g.over_capacity_allowance(), 1);
    // The former parent moved under the promoted peer and leaves: back within capacity.
    g.handle_message(id(1), TreeMsg::Leave { successor: None }, Millis(300));
    assert_eq!(g.child_count(), 2);
    assert_eq!(g.over_capacity_allowance(), 0);

    // It did not move in time: handed over the hard way.
    let mut g = setup();
    g.handle_message(id(2), promote.clone(), Millis(10));
    drain(&mut g);
    assert!(
        g.poll_timeout()
            .is_some_and(|t| t.0 <= 10 + PROMOTION_DEADLINE_MS)
    );
    g.handle_timeout(Millis(10 + PROMOTION_DEADLINE_MS));
    let s = sent(&drain(&mut g));
    assert!(s.contains(&(
        id(1),
        TreeMsg::Leave {
            successor: Some(id(2))
        }
    )));
    assert_eq!(g.child_count(), 2);
    assert_eq!(g.over_capacity_allowance(), 0);

    // Not for a peer that is not more capable than its parent: an ordinary (refused) move.
    let mut g = setup();
    g.handle_message(
        id(2),
        join_req(JoinKind::Promote, 2, Some(0), Some(id(1))),
        Millis(10),
    );
    let s = sent(&drain(&mut g));
    assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
    assert_eq!(g.child_count(), 2);
    // Nor for a peer its child did not list.
    let mut g = setup();
    g.handle_message(id(6), promote, Millis(10));
    let s = sent(&drain(&mut g));
    assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
    assert_eq!(g.over_capacity_allowance(), 0);
}

/// The promoted peer calls its former parent under it; full, it first sends its least
/// capable child to the slot it left there, and answers the former parent once that child
/// has gone.
#[test]
fn a_promoted_peer_takes_its_former_parent_under_it() {
    let mut c = attached(2, 1, &[0], 2);
    c.handle_message(id(5), join_req(JoinKind::New, 0, None, None), Millis(1));
    c.handle_message(id(6), join_req(JoinKind::New, 4, None, None), Millis(1));
    drain(&mut c);
    c.send_join(id(0), JoinKind::Promote, Some(0), Some(id(1)), Millis(10));
    drain(&mut c);
    let root = TreeUpdate {
        peer: id(0),
        parent: None,
        depth: 0,
        ancestors: vec![],
        children: vec![id(1), id(2)],
        capacity: 2,
        uplink_kbps: 0,
        seq: 3,
        ts_ms: 0,
    };
    c.handle_message(
        id(0),
        TreeMsg::Accept {
            parent: root,
            directory: vec![],
        },
        Millis(60),
    );
    let s = sent(&drain(&mut c));
    assert!(
        s.contains(&(id(1), TreeMsg::MoveUnder { target: id(2) })),
        "{s:?}"
    );
    assert!(
        s.contains(&(id(5), TreeMsg::MoveUnder { target: id(1) })),
        "{s:?}"
    );
    assert!(
        !s.iter()
            .any(|(to, m)| *to == id(1) && matches!(m, TreeMsg::Leave { .. })),
        "make-before-break: the former parent is not cut"
    );
    assert_eq!((c.parent(), c.depth()), (Some(id(0)), Some(1)));
    // The former parent's move waits for a free slot.
    c.handle_message(
        id(1),
        join_req(JoinKind::Move, 2, Some(1), None),
        Millis(120),
    );
    assert!(sent(&drain(&mut c)).is_empty());
    c.handle_message(id(5), TreeMsg::Leave { successor: None }, Millis(150));
    let s = sent(&drain(&mut c));
    assert!(
        s.iter()
            .any(|(to, m)| *to == id(1) && matches!(m, TreeMsg::Accept { .. })),
        "{s:?}"
    );
    assert_eq!(c.child_count(), 2);
}

/// The former parent moves under its promoted child and sends its other children there too
/// (make-before-break, bounded in depth); the word of a stranger moves
/// nobody.
#[test]
fn a_parent_told_by_its_promoted_child_moves_under_it() {
    let directed =
        |capacity: u16, max_depth: u16| join_req(JoinKind::Move, capacity, Some(max_depth), None);
    let mut p = attached(1, 0, &[], 2);
    p.handle_message(id(2), join_req(JoinKind::New, 8, None, None), Millis(1));
    p.handle_message(id(3), join_req(JoinKind::New, 0, None, None), Millis(1));
    drain(&mut p);
    p.handle_message(id(9), TreeMsg::MoveUnder { target: id(9) }, Millis(5));
    assert!(sent(&drain(&mut p)).is_empty());
    p.handle_message(id(2), TreeMsg::MoveUnder { target: id(2) }, Millis(10));
    let s = sent(&drain(&mut p));
    assert_eq!(
        s,
        vec![
            (id(3), TreeMsg::MoveUnder { target: id(2) }),
            (id(2), directed(2, 1)),
        ]
    );
    assert_eq!(p.children().collect::<Vec<_>>(), vec![id(3)]);
    assert_eq!(p.parent(), Some(id(0)), "still attached until accepted");
    // The other child, at depth 2, goes to the promoted peer one level above it.
    let mut c = attached(3, 1, &[0], 0);
    c.handle_message(id(1), TreeMsg::MoveUnder { target: id(2) }, Millis(20));
    assert_eq!(sent(&drain(&mut c)), vec![(id(2), directed(0, 1))]);
}

#[test]
fn a_newcomer_told_only_of_the_root_asks_it_if_it_can_relay() {
    let starved = Snapshot {
        candidates: vec![SlotAd {
            peer: id(0),
            depth: 0,
            free: 0,
            capacity: 0,
        }],
    };
    let mut relay = TreeNode::new(id(9), cfg(2), 1);
    relay.start(Millis(0));
    drain(&mut relay);
    relay.handle_snapshot(starved.clone(), Millis(10));
    let s = sent(&drain(&mut relay));
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].0, id(0));
    // A leaf-only newcomer waits for a real slot (it would only be refused).
    let mut leaf = TreeNode::new(id(8), cfg(0), 1);
    leaf.start(Millis(0));
    drain(&mut leaf);
    leaf.handle_snapshot(starved, Millis(10));
    let out = drain(&mut leaf);
    assert!(sent(&out).is_empty(), "{out:?}");
    assert!(out.contains(&Output::RequestSnapshot));
}

#[test]
fn the_lost_parent_guard_is_for_relays_and_lapses() {
    let o = Orphan {
        since: Millis(1_000),
        old_depth: 3,
        lost: Some(id(2)),
        successor: None,
        lost_ancestors: vec![id(0), id(1), id(2)],
        leaf_handover: false,
        link_down: true,
    };
    // A relay names its lost parent (candidates below it refuse: sibling subtrees repairing
    // at once must not adopt each other)...
    assert_eq!(o.cycle_guard(true, id(9), Millis(1_100)), Some(id(2)));
    // ...for a while only: a live lost parent would shut it out of its whole subtree.
    assert_eq!(
        o.cycle_guard(true, id(9), Millis(1_000 + CYCLE_GUARD_MS)),
        None
    );
    // Without children yet too: a handover target accepts while it repairs, so it may have
    // some by the time the answer comes. After the guard lapses it names the lost parent
    // only to the grandparent, which evicts a dead child on its word.
    assert_eq!(o.cycle_guard(false, id(9), Millis(1_100)), Some(id(2)));
    assert_eq!(o.cycle_guard(false, id(9), Millis(9_000)), None);
    assert_eq!(o.cycle_guard(false, id(1), Millis(9_000)), Some(id(2)));
    // Handed over as a leaf by a parent that may stay: never named, not even to the
    // grandparent (which would evict it with its whole subtree)...
    let h = Orphan {
        leaf_handover: true,
        ..o
    };
    assert_eq!(h.cycle_guard(false, id(9), Millis(1_100)), None);
    assert_eq!(h.cycle_guard(false, id(1), Millis(1_100)), None);
    // ...unless it took children since (a handover target accepts while repairing).
    assert_eq!(h.cycle_guard(true, id(9), Millis(1_100)), Some(id(2)));
}

#[test]
fn parent_accepts_up_to_capacity_and_refuses_the_rest() {
    let mut root = TreeNode::new_root(id(0), cfg(2), 7);
    for j in 1..=3u8 {
        root.handle_message(id(j), join_msg(JoinKind::New), Millis(j as u64));
    }
    let out = drain(&mut root);
    let s = sent(&out);
    let accepted: Vec<NodeId> = s
        .iter()
        .filter(|(_, m)| matches!(m, TreeMsg::Accept { .. }))
        .map(|(to, _)| *to)
        .collect();
    assert_eq!(accepted, vec![id(1), id(2)]);
    assert!(s.iter().any(|(to, m)| *to == id(3)
        && matches!(
            m,
            TreeMsg::Refuse {
                reason: RefuseReason::Full,
                ..
            }
        )));
    assert_eq!(root.child_count(), 2);
}

#[test]
fn leaf_only_peer_refuses_children() {
    let mut n = attached(5, 0, &[], 0);
    n.handle_message(id(6), join_msg(JoinKind::New), Millis(5));
    let s = sent(&drain(&mut n));
    assert!(matches!(
        s[0].1,
        TreeMsg::Refuse {
            reason: RefuseReason::Full,
            ..
        }
    ));
    assert_eq!(n.child_count(), 0);
}

#[test]
fn never_adopts_an_ancestor() {
    // 3 is under 2 under 1 under root 0: 1 must not become 3's child.
    let mut n = attached(3, 2, &[0, 1], 4);
    assert_eq!(n.depth(), Some(3));
    n.handle_message(id(1), join_msg(JoinKind::Repair), Millis(5));
    let s = sent(&drain(&mut n));
    assert!(matches!(
        s[0].1,
        TreeMsg::Refuse {
            reason: RefuseReason::Cycle,
            ..
        }
    ));
    // Nor the sibling subtree of a joiner whose lost parent is our ancestor.
    n.handle_message(
        id(7),
        join_req(JoinKind::Repair, 1, None, Some(id(2))),
        Millis(6),
    );
    let s = sent(&drain(&mut n));
    assert!(matches!(
        s[0].1,
        TreeMsg::Refuse {
            reason: RefuseReason::Cycle,
            ..
        }
    ));
}

#[test]
fn parent_loss_switches_to_backup_at_once() {
    let mut n = attached(5, 1, &[0], 4);
    let backup = n.backup().expect("a backup is chosen on attach");
    assert!(backup == id(50) || backup == id(51));
    n.handle_link_down(id(1), Millis(100));
    let out = drain(&mut n);
    assert!(out.contains(&Output::Event(TreeEvent::Orphaned { lost: id(1) })));
    let s = sent(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, backup);
    assert!(matches!(
        s[0].1,
        TreeMsg::Join {
            kind: JoinKind::Repair,
            ..
        }
    ));
    assert!(n.is_orphan() && !n.is_attached());
}

#[test]
fn graceful_leave_tells_children_and_parent() {
    let mut n = attached(5, 1, &[0], 4);
    n.handle_message(id(20), join_msg(JoinKind::New), Millis(1));
    n.handle_message(id(21), join_req(JoinKind::New, 8, None, None), Millis(1));
    drain(&mut n);
    n.leave(Millis(2));
    let s = sent(&drain(&mut n));
    let to = |p: NodeId| s.iter().find(|(t, _)| *t == p).map(|(_, m)| m.clone());
    // The most capable child inherits our slot at our parent.
    assert_eq!(
        to(id(21)),
        Some(TreeMsg::Leave {
            successor: Some(id(1))
        })
    );
    assert!(matches!(to(id(20)), Some(TreeMsg::Leave { .. })));
    assert_eq!(to(id(1)), Some(TreeMsg::Leave { successor: None }));
    assert!(n.has_left());
}

#[test]
fn a_cycle_announced_by_the_parent_is_left() {
    let mut n = attached(5, 1, &[0], 4);
    let upd = TreeUpdate {
        peer: id(1),
        parent: Some(id(5)),
        depth: 2,
        ancestors: vec![id(0), id(5)],
        children: vec![id(5)],
        capacity: 4,
        uplink_kbps: 0,
        seq: 9,
        ts_ms: 0,
    };
    n.handle_update(id(1), upd, Millis(3));
    let out = drain(&mut n);
    assert!(sent(&out).contains(&(id(1), TreeMsg::Leave { successor: None })));
    assert!(n.is_orphan());
}

#[test]
fn full_parent_forwards_to_its_subtree() {
    let mut root = TreeNode::new_root(id(0), cfg(1), 3);
    root.handle_message(id(1), join_msg(JoinKind::New), Millis(0));
    root.handle_message(
        id(1),
        TreeMsg::Summary {
            slots: vec![ad(1, 1, 3)],
        },
        Millis(1),
    );
    drain(&mut root);
    root.handle_message(id(2), join_msg(JoinKind::New), Millis(2));
    let s = sent(&drain(&mut root));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, id(1));
    assert!(matches!(
        s[0].1,
        TreeMsg::Join {
            joiner: Some(j),
            hops: 1,
            ..
        } if j == id(2)
    ));
}

#[test]
fn move_is_make_before_break() {
    let mut n = attached(5, 1, &[0, 8, 9], 8);
    assert_eq!(n.depth(), Some(4));
    n.handle_message(
        id(1),
        TreeMsg::Directory {
            slots: vec![ad(60, 1, 2)],
        },
        Millis(1),
    );
    drain(&mut n);
    n.handle_timeout(Millis(1_000_000));
    let s = sent(&drain(&mut n));
    assert!(
        s.iter().any(|(to, m)| *to == id(60)
            && matches!(
                m,
                TreeMsg::Join {
                    kind: JoinKind::Move,
                    ..
                }
            )),
        "{s:?}"
    );
    // Still attached to the old parent while the move is pending.
    assert_eq!(n.parent(), Some(id(1)));
    let upd = TreeUpdate {
        peer: id(60),
        parent: Some(id(0)),
        depth: 1,
        ancestors: vec![id(0)],
        children: vec![id(5)],
        capacity: 4,
        uplink_kbps: 0,
        seq: 1,
        ts_ms: 0,
    };
    n.handle_message(
        id(60),
        TreeMsg::Accept {
            parent: upd,
            directory: vec![],
        },
        Millis(1_000_100),
    );
    let s = sent(&drain(&mut n));
    assert!(s.contains(&(id(1), TreeMsg::Leave { successor: None })));
    assert_eq!(n.parent(), Some(id(60)));
    assert_eq!(n.depth(), Some(2));
}

/// The name of a message's kind; no wildcard, so a new kind must be added to the size test.
fn msg_kind(m: &TreeMsg) -> &'static str {
    match m {
        TreeMsg::Join { .. } => "Join",
        TreeMsg::Accept { .. } => "Accept",
        TreeMsg::Refuse { .. } => "Refuse",
        TreeMsg::Leave { .. } => "Leave",
        TreeMsg::Summary { .. } => "Summary",
        TreeMsg::Directory { .. } => "Directory",
        TreeMsg::Relocate => "Relocate",
        TreeMsg::MoveUnder { .. } => "MoveUnder",
    }
}

fn cbor(v: &impl serde::Serialize) -> Vec<u8> {
    let mut buf = Vec::new();
    ciborium::into_writer(v, &mut buf).expect("encodes");
    buf
}

/// `wire_len()` is the length of the encoding, for every kind of message; the figures are the
/// ones the hand-written size arithmetic gave before sizes were counted from the encoder, so
/// byte budgets and the simulator's traffic figures are unchanged.
#[test]
fn wire_len_is_the_encoded_length_of_every_message() {
    let upd = TreeUpdate {
        peer: id(1),
        parent: Some(id(2)),
        depth: 3,
        ancestors: vec![id(3), id(2)],
        children: vec![id(4)],
        capacity: 4,
        uplink_kbps: 12_000,
        seq: 77,
        ts_ms: 1_700_000_000_000,
    };
    let msgs = vec![
        (join_msg(JoinKind::Repair), 67),
        (
            TreeMsg::Accept {
                parent: upd.clone(),
                directory: vec![ad(1, 2, 3), ad(2, 300, 1)],
            },
            412,
        ),
        (
            TreeMsg::Refuse {
                reason: RefuseReason::NotAttached,
                hints: vec![ad(9, 1, 1)],
            },
            98,
        ),
        (
            TreeMsg::Leave {
                successor: Some(id(3)),
            },
            52,
        ),
        (TreeMsg::Summary { slots: vec![] }, 17),
        (
            TreeMsg::Directory {
                slots: vec![ad(5, 5, 5)],
            },
            82,
        ),
        (TreeMsg::Relocate, 9),
        (join_req(JoinKind::Promote, 8, Some(2), Some(id(4))), 101),
        (TreeMsg::MoveUnder { target: id(6) }, 53),
        (
            gone(join_req(JoinKind::Repair, 2, Some(1), Some(id(7)))),
            113,
        ),
    ];
    let kinds: BTreeSet<&str> = msgs.iter().map(|(m, _)| msg_kind(m)).collect();
    assert_eq!(kinds.len(), 8, "every kind of message: {kinds:?}");
    // `parent_gone` is left out when false: a Join encodes as it did before the field.
    assert!(
        !cbor(&join_msg(JoinKind::Repair))
            .windows(11)
            .any(|w| w == b"parent_gone")
    );
    for (m, len) in msgs {
        let buf = cbor(&m);
        assert_eq!((m.wire_len(), buf.len()), (len, len), "{m:?}");
        let back: TreeMsg = ciborium::from_reader(&buf[..]).expect("decodes");
        assert_eq!(back, m);
    }
    assert_eq!((upd.wire_len(), cbor(&upd).len()), (257, 257));
    let slot = ad(1, 2, 3);
    assert_eq!((slot.wire_len(), cbor(&slot).len()), (63, 63));
    let snap = Snapshot {
        candidates: vec![ad(1, 2, 3), ad(2, 300, 1)],
    };
    assert_eq!((snap.wire_len(), cbor(&snap).len()), (141, 141));
}

/// An orphan whose directory has nothing shallower than its old depth asks its lost parent's
/// parent, and gives a repair target only `repair_timeout_ms` (not `join_timeout_ms`).
#[test]
fn orphan_falls_back_on_the_grandparent_with_a_short_timeout() {
    let mut n = relay_with_a_deep_directory();
    n.handle_link_down(id(2), Millis(100));
    let s = sent(&drain(&mut n));
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].0, id(1), "the grandparent: {s:?}");
    assert!(matches!(
        s[0].1,
        TreeMsg::Join {
            kind: JoinKind::Repair,
            lost_parent: Some(l),
            max_depth: Some(2),
            parent_gone: true,
            ..
        } if l == id(2)
    ));
    n.handle_timeout(Millis(499));
    assert_eq!(n.join.pending.map(|p| p.target), Some(id(1)));
    drain(&mut n);
    n.handle_timeout(Millis(500));
    assert_ne!(n.join.pending.map(|p| p.target), Some(id(1)));
    assert!(!n.is_attached());
    let s = sent(&drain(&mut n));
    assert!(
        s.iter().all(|(to, _)| *to != id(1)),
        "the silent grandparent is not asked again at once: {s:?}"
    );
}

/// A relay its live parent dropped (it names no successor) asks the grandparent, but does not
/// claim the parent is gone: the grandparent must not evict a live relay and its subtree.
#[test]
fn an_evicted_relay_does_not_claim_its_parent_is_gone() {
    let mut n = relay_with_a_deep_directory();
    n.handle_message(id(2), TreeMsg::Leave { successor: None }, Millis(100));
    let s = sent(&drain(&mut n));
    let to_grandparent: Vec<_> = s.iter().filter(|(to, _)| *to == id(1)).collect();
    assert_eq!(to_grandparent.len(), 1, "{s:?}");
    assert!(
        matches!(
            to_grandparent[0].1,
            TreeMsg::Join {
                kind: JoinKind::Repair,
                parent_gone: false,
                ..
            }
        ),
        "{s:?}"
    );
}

fn update_of(peer: u8, parent: u8, children: &[u8]) -> TreeUpdate {
    TreeUpdate {
        peer: id(peer),
        parent: Some(id(parent)),
        depth: 1,
        ancestors: vec![id(parent)],
        children: children.iter().map(|c| id(*c)).collect(),
        capacity: 4,
        uplink_kbps: 0,
        seq: 1,
        ts_ms: 0,
    }
}

/// A full parent gives the slot of a child to that child's orphan, on the orphan's word that
/// the child is gone, but only to a peer the child itself listed as its child.
#[test]
fn grandparent_evicts_a_lost_child_for_its_orphan() {
    let mut g = TreeNode::new_root(id(0), cfg(1), 3);
    g.handle_message(id(2), join_msg(JoinKind::New), Millis(0));
    g.handle_update(id(2), update_of(2, 0, &[3]), Millis(1));
    drain(&mut g);
    let repair = |lost: u8| join_req(JoinKind::Repair, 4, Some(1), Some(id(lost)));
    // A stranger's word is not enough.
    g.handle_message(id(4), gone(repair(2)), Millis(2));
    let s = sent(&drain(&mut g));
    assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
    assert_eq!(g.children().collect::<Vec<_>>(), vec![id(2)]);
    // Nor a child's that was told to go by a live parent (evicted, or handed elsewhere):
    // evicting that parent would cut its whole subtree.
    g.handle_message(id(3), repair(2), Millis(3));
    let s = sent(&drain(&mut g));
    assert!(matches!(s[0].1, TreeMsg::Refuse { .. }), "{s:?}");
    assert_eq!(g.children().collect::<Vec<_>>(), vec![id(2)]);
    // The lost child's own child, whose link to it went down, takes its slot.
    g.handle_message(id(3), gone(repair(2)), Millis(3));
    let s = sent(&drain(&mut g));
    assert!(s.contains(&(id(2), TreeMsg::Leave { successor: None })));
    assert!(
        s.iter()
            .any(|(to, m)| *to == id(3) && matches!(m, TreeMsg::Accept { .. }))
    );
    assert_eq!(g.children().collect::<Vec<_>>(), vec![id(3)]);
}

/// A full candidate does not pass an orphan's request into the subtree of the parent it lost.
#[test]
fn forwarding_skips_the_lost_subtree() {
    let mut g = TreeNode::new_root(id(0), cfg(2), 3);
    for c in [1u8, 2] {
        g.handle_message(id(c), join_msg(JoinKind::New), Millis(0));
        g.handle_message(
            id(c),
            TreeMsg::Summary {
                slots: vec![ad(c + 10, 2, 3)],
            },
            Millis(1),
        );
    }
    drain(&mut g);
    g.handle_message(
        id(9),
        join_req(JoinKind::Repair, 0, None, Some(id(1))),
        Millis(2),
    );
    let s = sent(&drain(&mut g));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, id(12), "{s:?}");
}

/// Children of a parent with many slots send shorter summaries, and less often than the
/// interval when the parent's byte budget requires it.
#[test]
fn summaries_respect_the_parents_byte_budget() {
    let mut n = attached(5, 1, &[0], 4);
    assert_eq!(n.summary_entries(), 6);
    n.up.parent_capacity = 8;
    assert_eq!(n.summary_entries(), 3);
    n.slots.last_summary = vec![ad(5, 2, 4), ad(7, 3, 4), ad(8, 3, 4)];
    let len = TreeMsg::Summary {
        slots: n.slots.last_summary.clone(),
    }
    .wire_len() as u64;
    assert_eq!(n.summary_gap(), len * 8 * 1000 / 400);
    assert!(n.summary_gap() > n.cfg.summary_interval_ms);
    n.up.parent_capacity = 1;
    assert_eq!(n.summary_gap(), n.cfg.summary_interval_ms);
}

/// A refused move pushes the next rebalancing check further out.
#[test]
fn refused_move_backs_off() {
    let mut n = attached(5, 1, &[0, 8, 9], 8);
    n.handle_message(
        id(1),
        TreeMsg::Directory {
            slots: vec![ad(60, 1, 2)],
        },
        Millis(1),
    );
    drain(&mut n);
    let t = Millis(1_000_000);
    n.handle_timeout(t);
    drain(&mut n);
    n.handle_message(
        id(60),
        TreeMsg::Refuse {
            reason: RefuseReason::Full,
            hints: vec![],
        },
        t.plus(100),
    );
    assert_eq!(n.moves.move_failures, 1);
    let next = n.deadline(Timer::Rebalance).expect("still rebalancing");
    assert!(next >= t.plus(100 + 5_000), "{next:?}");
    assert_eq!(n.parent(), Some(id(1)));
}

/// The deep slots a full target hinted at when it refused a move do not hide the shallow
/// slots of the directory from the next move (they used to, for good: hints are cleared only
/// by an accept, and a sunk subtree stayed where it was).
#[test]
fn a_refused_moves_hints_do_not_hide_the_directory() {
    // Depth 6, with a child: a relay that rebalances.
    let mut n = attached(5, 1, &[0, 8, 9, 10, 11], 4);
    n.handle_message(id(7), join_msg(JoinKind::New), Millis(1));
    n.handle_message(
        id(1),
        TreeMsg::Directory {
            slots: vec![ad(60, 3, 2)],
        },
        Millis(2),
    );
    drain(&mut n);
    let t = Millis(1_000_000);
    n.handle_timeout(t);
    let moves_to = |s: &[(NodeId, TreeMsg)], peer: u8| {
        s.iter().any(|(to, m)| {
            *to == id(peer)
                && matches!(
                    m,
                    TreeMsg::Join {
                        kind: JoinKind::Move,
                        ..
                    }
                )
        })
    };
    let s = sent(&drain(&mut n));
    assert!(moves_to(&s, 60), "{s:?}");
    // Refused, with hints of slots only one level up: not worth a move.
    n.handle_message(
        id(60),
        TreeMsg::Refuse {
            reason: RefuseReason::Full,
            hints: vec![ad(61, 4, 2)],
        },
        t.plus(100),
    );
    drain(&mut n);
    // The directory learns of another shallow slot; the next check finds it.
    n.handle_message(
        id(1),
        TreeMsg::Directory {
            slots: vec![ad(62, 2, 3)],
        },
        t.plus(200),
    );
    drain(&mut n);
    let next = n.deadline(Timer::Rebalance).expect("still rebalancing");
    n.handle_timeout(next);
    let s = sent(&drain(&mut n));
    assert!(moves_to(&s, 62), "{s:?}");
}

/// A relay that a repair sank more than one level below its old depth looks for a better
/// place soon, not after a whole rebalancing interval.
#[test]
fn a_relay_repaired_far_below_its_old_depth_checks_again_soon() {
    let sink = |child: bool| {
        // Depth 3, as a relay (or not).
        let mut n = attached(5, 2, &[0, 1], 4);
        if child {
            n.handle_message(id(7), join_msg(JoinKind::New), Millis(1));
        }
        n.handle_message(
            id(2),
            TreeMsg::Directory {
                slots: vec![ad(60, 5, 2)],
            },
            Millis(2),
        );
        drain(&mut n);
        let t = Millis(100_000);
        let before = n.deadline(Timer::Rebalance);
        n.handle_link_down(id(2), t);
        let target = n.join.pending.map(|p| p.target).expect("repairing");
        let upd = TreeUpdate {
            peer: target,
            parent: Some(id(30)),
            depth: 5,
            ancestors: vec![id(0), id(30), id(31), id(32), id(33)],
            children: vec![id(5)],
            capacity: 4,
            uplink_kbps: 0,
            seq: 1,
            ts_ms: 0,
        };
        n.handle_message(
            target,
            TreeMsg::Accept {
                parent: upd,
                directory: vec![],
            },
            t.plus(300),
        );
        assert_eq!(n.depth(), Some(6));
        (before, n.deadline(Timer::Rebalance), t.plus(300))
    };
    let interval = cfg(4).rebalance_interval_ms;
    let (_, next, t) = sink(true);
    let next = next.expect("rebalancing");
    assert!(next > t && next.since(t) < interval / 2, "{next:?}");
    // A leaf's depth hardly matters: its schedule is unchanged.
    let (before, next, _) = sink(false);
    assert_eq!(before, next);
}

/// A shell that drives the timers from [`Output::Timer`] alone wakes when one that asks
/// `poll_timeout()` does: after every input the last announced deadline is the earliest one.
#[test]
fn the_timer_output_announces_the_earliest_deadline() {
    fn check(n: &mut TreeNode, armed: &mut Option<Millis>) {
        for o in drain(n) {
            if let Output::Timer(t) = o {
                *armed = Some(t);
            }
        }
        if let Some(t) = n.poll_timeout() {
            assert_eq!(*armed, Some(t));
        }
    }
    let mut armed = None;
    let mut n = TreeNode::new(id(5), cfg(4), 5);
    n.start(Millis(0));
    check(&mut n, &mut armed);
    n.handle_snapshot(
        Snapshot {
            candidates: vec![ad(1, 1, 2)],
        },
        Millis(10),
    );
    check(&mut n, &mut armed);
    n.set_rtt(id(1), 900);
    check(&mut n, &mut armed);
    n.handle_message(
        id(1),
        TreeMsg::Accept {
            parent: update_of(1, 0, &[5]),
            directory: vec![ad(50, 1, 2), ad(51, 2, 3)],
        },
        Millis(40),
    );
    check(&mut n, &mut armed);
    n.handle_message(id(7), join_msg(JoinKind::New), Millis(50));
    check(&mut n, &mut armed);
    let mut served = BTreeSet::new();
    for round in 0..40 {
        let Some(t) = n.poll_timeout() else { break };
        for timer in Timer::ALL {
            if n.deadline(timer).is_some_and(|d| d <= t) {
                served.insert(timer);
            }
        }
        n.handle_timeout(t);
        check(&mut n, &mut armed);
        if round == 5 {
            n.handle_link_down(id(1), t.plus(1));
            check(&mut n, &mut armed);
        }
    }
    assert!(
        served.len() >= 4,
        "several kinds of timers were served: {served:?}"
    );
}
