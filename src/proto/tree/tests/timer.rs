//! Timers seen from the shell: the announced deadline and `poll_timeout()` agree.

use std::collections::BTreeSet;

use super::*;

/// A shell that drives the timers from [`Output::Timer`] alone wakes when one that asks
/// `poll_timeout()` does: after every input the last announced deadline is the earliest one.
#[test]
fn the_timer_output_announces_the_earliest_deadline() {
    fn check(n: &mut TreeNode, armed: &mut Option<Millis>) {
        for o in drain(n) {
            if let Output::Timer(t) = o {
                *armed = Some(t);
            }
        }
        if let Some(t) = n.poll_timeout() {
            assert_eq!(*armed, Some(t));
        }
    }
    let mut armed = None;
    let mut n = TreeNode::new(id(5), cfg(4), 5);
    n.start(Millis(0));
    check(&mut n, &mut armed);
    n.handle_snapshot(
        Snapshot {
            candidates: vec![ad(1, 1, 2)],
        },
        Millis(10),
    );
    check(&mut n, &mut armed);
    n.set_rtt(id(1), 900);
    check(&mut n, &mut armed);
    n.handle_message(
        id(1),
        accept(update(1, &[0], &[5]), vec![ad(50, 1, 2), ad(51, 2, 3)]),
        Millis(40),
    );
    check(&mut n, &mut armed);
    n.handle_message(id(7), join_msg(JoinKind::New), Millis(50));
    check(&mut n, &mut armed);
    let mut served = BTreeSet::new();
    for round in 0..40 {
        let Some(t) = n.poll_timeout() else { break };
        for timer in Timer::ALL {
            if n.deadline(timer).is_some_and(|d| d <= t) {
                served.insert(timer);
            }
        }
        n.handle_timeout(t);
        check(&mut n, &mut armed);
        if round == 5 {
            n.handle_link_down(id(1), t.plus(1));
            check(&mut n, &mut armed);
        }
    }
    assert!(
        served.len() >= 4,
        "several kinds of timers were served: {served:?}"
    );
}
