//! The parent's side: accepting, refusing, passing a request down, and making room in a
//! starved room.

use super::*;

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
    assert!(refused_first(&s), "{s:?}");
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
    assert!(accepts(&s, 5));
    assert_eq!(root.children().collect::<Vec<_>>(), vec![id(5)]);
    assert!(root.child_count() <= root.capacity() as usize);
    // An equally capable child is never preempted.
    let mut root = TreeNode::new_root(id(0), cfg(1), 5);
    root.handle_message(id(3), join_msg(JoinKind::New), Millis(0));
    drain(&mut root);
    root.handle_message(id(5), repair, Millis(2));
    let s = sent(&drain(&mut root));
    assert!(refused_first(&s), "{s:?}");
}

/// Starved: a less capable relay child is handed over too (with its subtree); with no weaker
/// child, the request goes down to a relay child, which may have one.
#[test]
fn a_starved_parent_hands_over_a_weaker_relay_or_passes_the_request_down() {
    let relay_update = |cap: u16| TreeUpdate {
        capacity: cap,
        ..update(3, &[0], &[4])
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
