//! Ticket parsing (what a user pastes): no panic, and a parsed ticket prints to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waterfall::Ticket;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(t) = s.parse::<Ticket>()
    {
        let again: Ticket = t.to_string().parse().expect("a printed ticket parses");
        assert_eq!(t, again);
    }
});
