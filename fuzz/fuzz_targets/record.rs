//! What a DHT node runs on every record a stranger puts: the record validator and the
//! admission check (size, signature, kind, lifetime, ownership against a stored copy).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use waterfall::net::{RecordValidator, records};
use waterfall::node::records::validate_record;

fuzz_target!(|data: &[u8]| {
    let v: RecordValidator = Arc::new(validate_record);
    let now = records::now_unix_ms();
    let (stored, value) = data.split_at(data.len() / 2);
    let _ = records::check(&v, b"key", data, now);
    let _ = records::admit(&v, b"key", value, Some(stored), now);
});
