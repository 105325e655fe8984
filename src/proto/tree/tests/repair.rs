//! Repair: switching to the backup, leaving gracefully, the cycle guard, the grandparent's
//! slot, and looking for better after a repair that sank a relay.

use super::super::repair::{CYCLE_GUARD_MS, Orphan};
use super::*;

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
    // Our parent says its own path now runs through us.
    let upd = TreeUpdate {
        seq: 9,
        ..update(1, &[0, 5], &[5])
    };
    n.handle_update(id(1), upd, Millis(3));
    let out = drain(&mut n);
    assert!(sent(&out).contains(&(id(1), TreeMsg::Leave { successor: None })));
    assert!(n.is_orphan());
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

/// A full parent gives the slot of a child to that child's orphan, on the orphan's word that
/// the child is gone, but only to a peer the child itself listed as its child.
#[test]
fn grandparent_evicts_a_lost_child_for_its_orphan() {
    let mut g = TreeNode::new_root(id(0), cfg(1), 3);
    g.handle_message(id(2), join_msg(JoinKind::New), Millis(0));
    g.handle_update(id(2), update(2, &[0], &[3]), Millis(1));
    drain(&mut g);
    let repair = |lost: u8| join_req(JoinKind::Repair, 4, Some(1), Some(id(lost)));
    // A stranger's word is not enough.
    g.handle_message(id(4), gone(repair(2)), Millis(2));
    let s = sent(&drain(&mut g));
    assert!(refused_first(&s), "{s:?}");
    assert_eq!(g.children().collect::<Vec<_>>(), vec![id(2)]);
    // Nor a child's that was told to go by a live parent (evicted, or handed elsewhere):
    // evicting that parent would cut its whole subtree.
    g.handle_message(id(3), repair(2), Millis(3));
    let s = sent(&drain(&mut g));
    assert!(refused_first(&s), "{s:?}");
    assert_eq!(g.children().collect::<Vec<_>>(), vec![id(2)]);
    // The lost child's own child, whose link to it went down, takes its slot.
    g.handle_message(id(3), gone(repair(2)), Millis(3));
    let s = sent(&drain(&mut g));
    assert!(s.contains(&(id(2), TreeMsg::Leave { successor: None })));
    assert!(accepts(&s, 3));
    assert_eq!(g.children().collect::<Vec<_>>(), vec![id(3)]);
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
        n.handle_message(id(2), directory(vec![ad(60, 5, 2)]), Millis(2));
        drain(&mut n);
        let t = Millis(100_000);
        let before = n.deadline(Timer::Rebalance);
        n.handle_link_down(id(2), t);
        let target = n.join.pending.map(|p| p.target).expect("repairing");
        // Accepted at depth 6, three levels below the old place.
        let upd = TreeUpdate {
            peer: target,
            ..update(0, &[0, 30, 31, 32, 33], &[5])
        };
        n.handle_message(target, accept(upd, vec![]), t.plus(300));
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
