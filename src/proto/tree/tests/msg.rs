//! Messages on the wire: sizes and encoding.

use std::collections::BTreeSet;

use super::*;

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
        (accept(upd.clone(), vec![ad(1, 2, 3), ad(2, 300, 1)]), 412),
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
        (directory(vec![ad(5, 5, 5)]), 82),
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
