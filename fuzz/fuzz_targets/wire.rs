//! Every top-level wire message through strict decoding: no panic, and what decodes encodes
//! back to a value that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waterfall::wire::{
    self, BroadcastEnd, Control, Envelope, Notice, RoomRecord, RoomRequest, RoomResponse, Signal,
    SnapshotRequest, SnapshotResponse,
};

fn round_trip<T>(data: &[u8])
where
    T: wire::Message + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = wire::decode::<T>(data) {
        let again: T = wire::decode(&wire::encode(&v)).expect("what decoded re-encodes");
        assert_eq!(v, again);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Envelope>(data);
    round_trip::<RoomRecord>(data);
    round_trip::<RoomRequest>(data);
    round_trip::<RoomResponse>(data);
    round_trip::<Control>(data);
    round_trip::<Signal>(data);
    round_trip::<Notice>(data);
    round_trip::<SnapshotRequest>(data);
    round_trip::<SnapshotResponse>(data);
    round_trip::<BroadcastEnd>(data);
});
