//! The file and pipe parsers (IVF, Ogg Opus, H.264 Annex-B) over arbitrary bytes: no panic,
//! and a bounded number of frames per input.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use waterfall::media::source::{AnnexBParser, FrameParser, IvfParser, OggOpusParser};

fn drain(mut p: impl FrameParser) {
    for _ in 0..1024 {
        match p.next_frame() {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let r = || Box::new(Cursor::new(data.to_vec()));
    if let Ok(p) = IvfParser::new(r()) {
        drain(p);
    }
    if let Ok(p) = OggOpusParser::new(r()) {
        drain(p);
    }
    drain(AnnexBParser::new(r(), 30));
});
