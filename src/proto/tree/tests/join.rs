//! The joiner's side: which candidate a newcomer asks, and how deep it lets a full candidate
//! pass it down.

use std::collections::BTreeSet;

use super::*;

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
