//! Unit tests of the tree state machine, one file per role like the rules they test, and the
//! helpers they share. Peers are named by one byte (`id(3)`), so expected messages read as
//! the scenario in each test's comment.

mod admit;
mod join;
mod msg;
mod rebalance;
mod repair;
mod slots;
mod timer;

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

/// Whether `to` was sent an Accept.
fn accepts(s: &[(NodeId, TreeMsg)], to: u8) -> bool {
    s.iter()
        .any(|(t, m)| *t == id(to) && matches!(m, TreeMsg::Accept { .. }))
}

/// Whether the first message sent is a refusal.
fn refused_first(s: &[(NodeId, TreeMsg)]) -> bool {
    matches!(s.first(), Some((_, TreeMsg::Refuse { .. })))
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

/// The update of `peer`, whose path from the root is `ancestors` (so its parent is the last
/// of them and its depth their number), with these children and capacity 4.
fn update(peer: u8, ancestors: &[u8], children: &[u8]) -> TreeUpdate {
    TreeUpdate {
        peer: id(peer),
        parent: ancestors.last().map(|a| id(*a)),
        depth: ancestors.len() as u16,
        ancestors: ancestors.iter().map(|a| id(*a)).collect(),
        children: children.iter().map(|c| id(*c)).collect(),
        capacity: 4,
        uplink_kbps: 0,
        seq: 1,
        ts_ms: 0,
    }
}

/// An Accept from the peer whose update this is.
fn accept(parent: TreeUpdate, directory: Vec<SlotAd>) -> TreeMsg {
    TreeMsg::Accept { parent, directory }
}

fn directory(slots: Vec<SlotAd>) -> TreeMsg {
    TreeMsg::Directory { slots }
}

/// A viewer attached under `parent`, whose path from the root is `ancestors`; its directory
/// names two slots at depth 1 (its backups).
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
    n.handle_message(
        id(parent),
        accept(
            update(parent, ancestors, &[me]),
            vec![ad(50, 1, 2), ad(51, 1, 3)],
        ),
        t,
    );
    drain(&mut n);
    n
}

/// A relay at depth 3 (one child) under 2, whose directory knows nothing shallower than
/// depth 6: on losing its parent, the grandparent is the one to ask.
fn relay_with_a_deep_directory() -> TreeNode {
    let mut n = attached(5, 2, &[0, 1], 4);
    n.handle_message(id(7), join_msg(JoinKind::New), Millis(1));
    n.handle_message(id(2), directory(vec![ad(60, 6, 2)]), Millis(2));
    drain(&mut n);
    n
}
