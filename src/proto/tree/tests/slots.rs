//! Summaries and the parent's byte budget.

use super::*;

/// Children of a parent with many slots send shorter summaries, and less often than the
/// interval when the parent's byte budget requires it.
#[test]
fn summaries_respect_the_parents_byte_budget() {
    let mut n = attached(5, 1, &[0], 4);
    assert_eq!(n.summary_entries(), 6);
    n.up.parent_capacity = 8;
    assert_eq!(n.summary_entries(), 3);
    n.slots.last_summary = vec![ad(5, 2, 4), ad(7, 3, 4), ad(8, 3, 4)];
    let len = TreeMsg::Summary {
        slots: n.slots.last_summary.clone(),
    }
    .wire_len() as u64;
    assert_eq!(n.summary_gap(), len * 8 * 1000 / 400);
    assert!(n.summary_gap() > n.cfg.summary_interval_ms);
    n.up.parent_capacity = 1;
    assert_eq!(n.summary_gap(), n.cfg.summary_interval_ms);
}
