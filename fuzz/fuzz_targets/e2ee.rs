//! Frame decryption and the depacketized layouts it undoes (clear prefix, H.264 per NAL unit
//! with emulation prevention, AV1 per OBU) and encryption of arbitrary frames: no panic on any
//! input, and what encrypts decrypts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waterfall::media::e2ee::{self, MediaKey};
use waterfall::media::Codec;

const CODECS: [Codec; 5] = [Codec::Vp8, Codec::Vp9, Codec::H264, Codec::Av1, Codec::Opus];

fuzz_target!(|data: &[u8]| {
    let key = MediaKey::new([7; 32]);
    for codec in CODECS {
        let _ = key.decrypt_frame(codec, data);
        let _ = e2ee::is_keyframe(codec, data);
        // What a source could hand us: whatever encrypts must decrypt (the layout may drop NAL
        // units or OBUs RTP cannot carry, so the bytes need not be equal).
        if let Ok(sealed) = key.encrypt_frame(codec, data) {
            assert!(key.decrypt_frame(codec, &sealed).is_ok());
        }
    }
    let _ = key.decrypt_data(data);
    let _ = e2ee::emulation_remove(data);
});
