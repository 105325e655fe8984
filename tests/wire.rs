//! Wire format: round trips, golden vectors byte for byte, and hostile input.
//!
//! Regenerate the vectors after a deliberate format change with
//! `WATERFALL_REGEN_VECTORS=1 cargo test --test wire` (and bump the version if old peers break).

use proptest::prelude::*;
use waterfall::crypto::{Identity, Kind};
use waterfall::wire::*;

fn id(b: u8) -> NodeId {
    NodeId([b; 32])
}

fn room(b: u8) -> RoomId {
    RoomId([b; 32])
}

/// A tree update as the payload of its envelope: the tree's own type, version in front.
type Update = Versioned<TreeUpdate>;

fn signer() -> Identity {
    Identity::from_secret(&[42u8; 32])
}

fn samples() -> Vec<(&'static str, Vec<u8>)> {
    let record = RoomRecord {
        v: VERSION,
        broadcaster: signer().node_id(),
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        tracks: vec![
            TrackInfo {
                kind: TrackKind::Video,
                codec: "video/VP8".into(),
                clock_rate: 90_000,
            },
            TrackInfo {
                kind: TrackKind::Audio,
                codec: "audio/opus".into(),
                clock_rate: 48_000,
            },
        ],
        data: true,
        fanout: 4,
        bitrate_kbps: 1_000,
        created_ms: 1_764_000_000_000,
        expires_ms: 1_764_000_600_000,
        seq: 3,
    };
    let update = Versioned(TreeUpdate {
        peer: id(2),
        parent: Some(id(1)),
        depth: 1,
        ancestors: vec![id(1)],
        children: vec![id(3), id(4)],
        capacity: 4,
        uplink_kbps: 10_000,
        seq: 9,
        ts_ms: 1_764_000_000_500,
    });
    let root_update = Versioned(TreeUpdate {
        parent: None,
        depth: 0,
        ancestors: vec![],
        peer: id(1),
        ..update.0.clone()
    });
    let env = signer().seal_envelope(Kind::TreeUpdate, 9, 1_764_000_060_000, encode(&update));
    let signal = Signal {
        v: VERSION,
        room: room(9),
        from: id(3),
        to: id(2),
        nonce: Nonce16([5; 16]),
        kind: SdpKind::Offer,
        sdp: "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n".into(),
        ts_ms: 1_764_000_000_700,
    };
    let notice = Notice {
        v: VERSION,
        room: room(9),
        from: id(2),
        to: id(3),
        nonce: Nonce16([5; 16]),
        kind: SdpKind::Answer,
        blob_key: [0xAB; 32],
    };
    let ticket = Ticket {
        v: VERSION,
        room: "standup".into(),
        broadcaster: signer().node_id(),
        addrs: vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()],
        check: vec![1, 2, 3, 4, 5, 6, 7, 8],
    };
    let control = Control {
        v: VERSION,
        room: room(9),
        from: id(3),
        to: id(2),
        msg: waterfall::proto::TreeMsg::Leave {
            successor: Some(id(1)),
        },
    };
    let request = RoomRequest {
        v: VERSION,
        room: room(9),
        env: env.clone(),
    };
    let response = RoomResponse {
        v: VERSION,
        env: None,
        error: Some("not a child of this node".into()),
    };
    vec![
        ("control", encode(&control)),
        ("room_request", encode(&request)),
        ("room_response", encode(&response)),
        ("ticket", encode(&ticket)),
        ("room_record", encode(&record)),
        ("tree_update", encode(&update)),
        ("tree_update_root", encode(&root_update)),
        ("envelope", encode(&env)),
        (
            "snapshot_request",
            encode(&SnapshotRequest {
                v: VERSION,
                room: room(9),
                max: 16,
            }),
        ),
        (
            "snapshot_response",
            encode(&SnapshotResponse {
                v: VERSION,
                room: room(9),
                candidates: vec![SlotAd {
                    peer: id(2),
                    depth: 1,
                    free: 2,
                    capacity: 4,
                }],
            }),
        ),
        ("signal", encode(&signal)),
        ("notice", encode(&notice)),
        (
            "broadcast_end",
            encode(&BroadcastEnd {
                v: VERSION,
                room: room(9),
                created_ms: 1_764_000_000_000,
            }),
        ),
        (
            "frame_header",
            FrameHeader {
                track: 0,
                flags: FRAME_KEYFRAME,
                clear_len: 10,
                frame_seq: 77,
            }
            .encode()
            .to_vec(),
        ),
    ]
}

/// Decode with the type named by the vector, re-encode.
fn reencode(name: &str, bytes: &[u8]) -> Result<Vec<u8>, WireError> {
    Ok(match name {
        "room_record" => encode(&decode::<RoomRecord>(bytes)?),
        "ticket" => encode(&decode::<Ticket>(bytes)?),
        "control" => encode(&decode::<Control>(bytes)?),
        "room_request" => encode(&decode::<RoomRequest>(bytes)?),
        "room_response" => encode(&decode::<RoomResponse>(bytes)?),
        "tree_update" | "tree_update_root" => encode(&decode::<Update>(bytes)?),
        "envelope" => encode(&decode::<Envelope>(bytes)?),
        "snapshot_request" => encode(&decode::<SnapshotRequest>(bytes)?),
        "snapshot_response" => encode(&decode::<SnapshotResponse>(bytes)?),
        "signal" => encode(&decode::<Signal>(bytes)?),
        "notice" => encode(&decode::<Notice>(bytes)?),
        "broadcast_end" => encode(&decode::<BroadcastEnd>(bytes)?),
        "frame_header" => FrameHeader::decode(bytes)?.encode().to_vec(),
        other => panic!("unknown vector {other}"),
    })
}

fn vector_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("proto/vectors")
        .join(format!("{name}.hex"))
}

#[test]
fn golden_vectors_byte_for_byte() {
    let regen = std::env::var_os("WATERFALL_REGEN_VECTORS").is_some();
    for (name, bytes) in samples() {
        let path = vector_path(name);
        if regen {
            std::fs::write(&path, format!("{}\n", hex::encode(&bytes))).unwrap();
        }
        let golden =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let golden = hex::decode(golden.trim()).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            hex::encode(&golden),
            "{name}: encoding changed"
        );
        assert_eq!(
            reencode(name, &golden).unwrap(),
            golden,
            "{name}: re-encoding differs"
        );
    }
}

#[test]
fn every_message_round_trips() {
    for (name, bytes) in samples() {
        assert_eq!(reencode(name, &bytes).unwrap(), bytes, "{name}");
    }
    // The signed envelope in the vectors verifies (before its expiry) and carries a tree update.
    let env: Envelope = decode(
        &hex::decode(
            std::fs::read_to_string(vector_path("envelope"))
                .unwrap()
                .trim(),
        )
        .unwrap(),
    )
    .unwrap();
    env.verify_kind(Kind::TreeUpdate, 1_764_000_000_000)
        .unwrap();
    let upd: Update = decode(&env.payload).unwrap();
    assert_eq!(upd.0.depth, 1);
    assert_eq!(env.signer, signer().node_id());
}

#[test]
fn truncations_and_wrong_types_are_typed_errors() {
    for (name, bytes) in samples() {
        for cut in 0..bytes.len() {
            assert!(
                reencode(name, &bytes[..cut]).is_err(),
                "{name} cut at {cut}"
            );
        }
    }
    // A tree update decoded as a room record: a typed error, not a panic or a wrong value.
    let upd = samples()[5].1.clone();
    assert!(matches!(
        decode::<RoomRecord>(&upd),
        Err(WireError::Malformed { .. })
    ));
    // Not a map at all.
    assert!(matches!(
        decode::<Update>(&[0x01]),
        Err(WireError::Malformed { .. })
    ));
    // An id of the wrong length.
    let mut bad = TreeUpdate {
        peer: id(1),
        parent: None,
        depth: 0,
        ancestors: vec![],
        children: vec![],
        capacity: 0,
        uplink_kbps: 0,
        seq: 0,
        ts_ms: 0,
    };
    bad.capacity = 1;
    let mut bytes = encode(&Versioned(bad.clone()));
    // "peer" key is followed by 0x58 0x20 (bytes, 32): shorten the declared length to 31.
    let pos = bytes.windows(2).position(|w| w == [0x58, 0x20]).unwrap();
    bytes[pos + 1] = 31;
    assert!(decode::<Update>(&bytes).is_err());
    // The version field exactly once, wherever it is.
    let mut twice = encode(&Versioned(bad));
    twice[0] += 1; // one more map entry
    twice.extend_from_slice(&[0x61, b'v', 0x01]);
    assert!(matches!(
        decode::<Update>(&twice),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn ticket_text_round_trip() {
    let (_, bytes) = samples().swap_remove(3);
    let t: Ticket = decode(&bytes).unwrap();
    let text = t.to_string();
    assert!(text.starts_with("wf1"));
    assert_eq!(text.parse::<Ticket>().unwrap(), t);
    assert!("wf1".parse::<Ticket>().is_err());
    assert!("xx1abc".parse::<Ticket>().is_err());
    assert!(format!("{text}0OIl").parse::<Ticket>().is_err());
}

#[test]
fn huge_declared_lengths_do_not_allocate() {
    // bytes of declared length 2^62 inside a map: must be an error, quickly.
    let mut m = vec![0xA2, 0x61, b'v', 0x01, 0x64];
    m.extend_from_slice(b"peer");
    m.extend_from_slice(&[0x5B, 0x40, 0, 0, 0, 0, 0, 0, 0]);
    assert!(decode::<Update>(&m).is_err());
    // an array of declared length 2^62
    let mut m = vec![0xA2, 0x61, b'v', 0x01, 0x69];
    m.extend_from_slice(b"ancestors");
    m.extend_from_slice(&[0x9B, 0x40, 0, 0, 0, 0, 0, 0, 0]);
    assert!(decode::<Update>(&m).is_err());
    // deep nesting
    let deep = vec![0x81u8; 4000];
    assert!(decode::<SnapshotResponse>(&deep).is_err());
}

fn decode_all(bytes: &[u8]) {
    let _ = decode::<RoomRecord>(bytes);
    let _ = decode::<Ticket>(bytes);
    let _ = decode::<Control>(bytes);
    let _ = decode::<RoomRequest>(bytes);
    let _ = decode::<RoomResponse>(bytes);
    if let Ok(s) = std::str::from_utf8(bytes) {
        let _ = s.parse::<Ticket>();
    }
    let _ = decode::<Update>(bytes);
    let _ = decode::<Envelope>(bytes);
    let _ = decode::<SnapshotRequest>(bytes);
    let _ = decode::<SnapshotResponse>(bytes);
    let _ = decode::<Signal>(bytes);
    let _ = decode::<Notice>(bytes);
    let _ = decode::<BroadcastEnd>(bytes);
    let _ = FrameHeader::decode(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(which in 0usize..14, pos in any::<usize>(), val in any::<u8>(), cut in any::<usize>()) {
        let (_, mut bytes) = samples().swap_remove(which);
        let p = pos % bytes.len();
        bytes[p] = val;
        bytes.truncate(1 + cut % bytes.len());
        decode_all(&bytes);
    }

    #[test]
    fn tree_updates_round_trip(peer in any::<[u8; 32]>(), depth in any::<u16>(), kids in 0usize..8, seq in any::<u64>(), ts in any::<u64>(), cap in any::<u16>()) {
        let u = Versioned(TreeUpdate {
            peer: NodeId(peer),
            parent: if depth == 0 { None } else { Some(id(1)) },
            depth,
            ancestors: (0..depth.min(8)).map(|i| id(i as u8)).collect(),
            children: (0..kids).map(|i| id(100 + i as u8)).collect(),
            capacity: cap,
            uplink_kbps: 1,
            seq,
            ts_ms: ts,
        });
        prop_assert_eq!(decode::<Update>(&encode(&u)).unwrap(), u);
    }
}
