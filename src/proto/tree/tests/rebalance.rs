//! Rebalancing: make-before-break moves, their back-off, and promotions.

use super::super::rebalance::PROMOTION_DEADLINE_MS;
use super::*;

#[test]
fn move_is_make_before_break() {
    let mut n = attached(5, 1, &[0, 8, 9], 8);
    assert_eq!(n.depth(), Some(4));
    n.handle_message(id(1), directory(vec![ad(60, 1, 2)]), Millis(1));
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
    n.handle_message(
        id(60),
        accept(update(60, &[0], &[5]), vec![]),
        Millis(1_000_100),
    );
    let s = sent(&drain(&mut n));
    assert!(s.contains(&(id(1), TreeMsg::Leave { successor: None })));
    assert_eq!(n.parent(), Some(id(60)));
    assert_eq!(n.depth(), Some(2));
}

/// A refused move pushes the next rebalancing check further out.
#[test]
fn refused_move_backs_off() {
    let mut n = attached(5, 1, &[0, 8, 9], 8);
    n.handle_message(id(1), directory(vec![ad(60, 1, 2)]), Millis(1));
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
    n.handle_message(id(1), directory(vec![ad(60, 3, 2)]), Millis(2));
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
    n.handle_message(id(1), directory(vec![ad(62, 2, 3)]), t.plus(200));
    drain(&mut n);
    let next = n.deadline(Timer::Rebalance).expect("still rebalancing");
    n.handle_timeout(next);
    let s = sent(&drain(&mut n));
    assert!(moves_to(&s, 62), "{s:?}");
}

/// A full root (capacity 2) whose child 1 has a child 2 more capable than itself.
fn grandparent() -> TreeNode {
    let mut g = TreeNode::new_root(id(0), cfg(2), 9);
    g.handle_message(id(1), join_req(JoinKind::New, 2, None, None), Millis(0));
    g.handle_message(id(3), join_req(JoinKind::New, 4, None, None), Millis(0));
    g.handle_update(
        id(1),
        TreeUpdate {
            capacity: 2,
            ..update(1, &[0], &[2])
        },
        Millis(0),
    );
    drain(&mut g);
    g
}

/// A node that leaves keeps no deadline, the promotion timers included: a shell that sleeps
/// until `poll_timeout` must not wake for a node that is gone.
#[test]
fn leaving_clears_the_promotion_timers_too() {
    let mut g = grandparent();
    g.handle_message(
        id(2),
        join_req(JoinKind::Promote, 8, Some(0), Some(id(1))),
        Millis(10),
    );
    drain(&mut g);
    assert!(
        g.deadline(Timer::PromotionEnd).is_some(),
        "promotion granted"
    );
    g.leave(Millis(20));
    assert_eq!(g.poll_timeout(), None);
}

/// A grandparent puts a child's more capable child in the child's place: one over capacity
/// until the former parent has moved under it, or the deadline hands it over.
#[test]
fn a_grandparent_grants_a_promotion_for_a_bounded_overlap() {
    let promote = join_req(JoinKind::Promote, 8, Some(0), Some(id(1)));

    let mut g = grandparent();
    g.handle_message(id(2), promote.clone(), Millis(10));
    let s = sent(&drain(&mut g));
    assert!(accepts(&s, 2), "{s:?}");
    assert_eq!(g.child_count(), 3);
    assert_eq!(g.over_capacity_allowance(), 1);
    // The former parent moved under the promoted peer and leaves: back within capacity.
    g.handle_message(id(1), TreeMsg::Leave { successor: None }, Millis(300));
    assert_eq!(g.child_count(), 2);
    assert_eq!(g.over_capacity_allowance(), 0);

    // It did not move in time: handed over the hard way.
    let mut g = grandparent();
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
    let mut g = grandparent();
    g.handle_message(
        id(2),
        join_req(JoinKind::Promote, 2, Some(0), Some(id(1))),
        Millis(10),
    );
    let s = sent(&drain(&mut g));
    assert!(refused_first(&s), "{s:?}");
    assert_eq!(g.child_count(), 2);
    // Nor for a peer its child did not list.
    let mut g = grandparent();
    g.handle_message(id(6), promote, Millis(10));
    let s = sent(&drain(&mut g));
    assert!(refused_first(&s), "{s:?}");
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
        capacity: 2,
        seq: 3,
        ..update(0, &[], &[1, 2])
    };
    c.handle_message(id(0), accept(root, vec![]), Millis(60));
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
    assert!(accepts(&s, 1), "{s:?}");
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
