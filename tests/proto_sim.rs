//! Simulator tests: the tree under churn, crashes and mass departures keeps its invariants.

use proptest::prelude::*;
use waterfall::proto::RoomTimings;
use waterfall::proto::sim::{
    CapacityDist, CrashDetection, MassDeparture, SimConfig, ideal_depth, run,
};

/// 1,000 viewers, fanout 4, heterogeneous capacity, 10-minute mean sessions, 50 ms links, every
/// invariant checked on every step.
#[test]
fn thousand_nodes_under_churn_stay_shallow_and_connected() {
    let cfg = SimConfig {
        nodes: 1000,
        duration_secs: 300.0,
        seed: 7,
        ..SimConfig::default()
    };
    let r = run(&cfg);
    eprintln!("{r}");
    assert_eq!(r.violations.total(), 0, "{:?}", r.violations);
    assert_eq!(r.ideal_depth, 5);
    assert!(
        r.depth.p99 <= (r.ideal_depth + 2) as f64,
        "depth p99 {}",
        r.depth.p99
    );
    assert!(
        r.final_max_depth <= r.ideal_depth + 4,
        "final max {}",
        r.final_max_depth
    );
    assert!(r.continuity >= 0.99, "continuity {}", r.continuity);
    assert!(r.outage_ms.p50 <= 1000.0, "outage p50 {}", r.outage_ms.p50);
    assert!(r.join_ms.p50 <= 1000.0, "join p50 {}", r.join_ms.p50);
    assert!(r.leaves > 50 && r.crashes > 10, "churn happened");
    assert!(r.attached_at_end * 100 >= r.live_at_end * 99);
    // Control traffic a viewer receives stays small; once the initial join wave is over, even
    // for the busiest viewer.
    assert!(
        r.rx_bytes_per_sec.mean < 1250.0,
        "{}",
        r.rx_bytes_per_sec.mean
    );
    assert!(r.steady_rx_bytes_per_sec.count > 100);
    assert!(
        r.steady_rx_bytes_per_sec.max < 1250.0,
        "{}",
        r.steady_rx_bytes_per_sec.max
    );
}

#[test]
fn same_seed_same_trace() {
    let cfg = SimConfig {
        nodes: 200,
        duration_secs: 120.0,
        churn_mean_secs: Some(60.0),
        seed: 42,
        ..SimConfig::default()
    };
    let a = serde_json::to_string(&run(&cfg)).expect("serializes");
    let b = serde_json::to_string(&run(&cfg)).expect("serializes");
    assert_eq!(a, b);
    let c = serde_json::to_string(&run(&SimConfig { seed: 43, ..cfg })).expect("serializes");
    assert_ne!(a, c, "the seed matters");
}

#[test]
fn no_churn_tree_is_near_ideal() {
    let cfg = SimConfig {
        nodes: 1000,
        duration_secs: 60.0,
        churn_mean_secs: None,
        capacity: CapacityDist::Fixed,
        join_rate_per_sec: 50.0,
        seed: 3,
        ..SimConfig::default()
    };
    let r = run(&cfg);
    eprintln!("{r}");
    assert_eq!(r.violations.total(), 0);
    assert_eq!(r.attached_at_end, 1000);
    assert!(
        r.final_max_depth <= ideal_depth(1000, 4) + 1,
        "{}",
        r.final_max_depth
    );
    assert_eq!(r.outage_ms.count, 0);
}

/// Heterogeneous capacities (a sixth of the room leaf-only), no churn: once the flash crowd has
/// settled, no sample sees a viewer deeper than ideal + 1 (the first-come placement of the wave
/// is repaired by promotion and rebalancing, make-before-break).
#[test]
fn a_heterogeneous_room_settles_within_ideal_plus_one() {
    let cfg = SimConfig {
        nodes: 2000,
        duration_secs: 240.0,
        churn_mean_secs: None,
        seed: 5,
        ..SimConfig::default()
    };
    let r = run(&cfg);
    eprintln!("{r}");
    assert_eq!(r.violations.total(), 0, "{:?}", r.violations);
    assert_eq!(r.attached_at_end, 2000);
    let wave = cfg.nodes as f64 / cfg.join_rate_per_sec;
    // Settled within two minutes of the wave's end (virtual time), and stays so.
    assert!(
        r.last_sample_over_ideal_plus_one_secs
            .is_none_or(|t| t <= wave + 120.0),
        "{:?}",
        r.last_sample_over_ideal_plus_one_secs
    );
    assert!(r.final_max_depth <= r.ideal_depth + 1);
    assert!(r.steady_sample_max.count > 10);
}

#[test]
fn losing_all_of_the_roots_children_at_once_is_repaired() {
    let cfg = SimConfig {
        nodes: 500,
        duration_secs: 90.0,
        churn_mean_secs: None,
        kill_root_children_at_secs: Some(30.0),
        seed: 11,
        ..SimConfig::default()
    };
    let r = run(&cfg);
    eprintln!("{r}");
    assert_eq!(r.violations.total(), 0, "{:?}", r.violations);
    assert!(r.crashes >= 1);
    assert_eq!(r.attached_at_end, r.live_at_end, "everyone reattached");
    assert!(r.outage_ms.count > 100, "the whole tree was cut");
    assert!(r.outage_ms.p99 < 10_000.0, "{}", r.outage_ms.p99);
}

#[test]
fn mass_departure_is_repaired() {
    for graceful in [true, false] {
        let cfg = SimConfig {
            nodes: 500,
            duration_secs: 90.0,
            churn_mean_secs: None,
            mass_departure: Some(MassDeparture {
                at_secs: 30.0,
                fraction: 0.3,
                graceful,
            }),
            seed: 5,
            ..SimConfig::default()
        };
        let r = run(&cfg);
        eprintln!("{r}");
        assert_eq!(r.violations.total(), 0, "{:?}", r.violations);
        assert_eq!(r.attached_at_end, r.live_at_end);
        assert!(r.live_at_end <= 360);
    }
}

/// One room of the property test below; the regression tests after it are its shrunk failures.
struct Room {
    seed: u64,
    nodes: usize,
    fanout: u16,
    churn: Option<f64>,
    crash: f64,
    fixed: bool,
    /// Fraction leaving at 40 s, and whether gracefully.
    mass: Option<(f64, bool)>,
    /// Kill all of the root's children at 50 s.
    kill_root_children: bool,
    latency: f64,
}

impl Room {
    fn config(&self) -> SimConfig {
        SimConfig {
            nodes: self.nodes,
            fanout: self.fanout,
            churn_mean_secs: self.churn,
            duration_secs: 120.0,
            seed: self.seed,
            link_latency_ms: self.latency,
            capacity: if self.fixed {
                CapacityDist::Fixed
            } else {
                CapacityDist::Heterogeneous
            },
            join_rate_per_sec: 20.0,
            crash_fraction: self.crash,
            mass_departure: self.mass.map(|(fraction, graceful)| MassDeparture {
                at_secs: 40.0,
                fraction,
                graceful,
            }),
            kill_root_children_at_secs: self.kill_root_children.then_some(50.0),
            ..SimConfig::default()
        }
    }

    /// Runs the room and asserts no invariant was violated.
    fn holds(&self) {
        let r = run(&self.config());
        assert_eq!(r.violations.total(), 0, "{r}");
    }
}

proptest! {
    // A fixed seed keeps CI reproducible; explore new cases with PROPTEST_RNG_SEED=<n> (the
    // environment wins over this default only when set, see proptest's config docs) or by
    // changing it here.
    #![proptest_config(ProptestConfig {
        cases: 24,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0001),
        .. ProptestConfig::default()
    })]

    /// Random populations, sessions, crash shares, capacities and mass events: no cycle, nobody
    /// over capacity, no outage beyond the bound, bookkeeping consistent.
    #[test]
    fn invariants_hold_under_random_join_leave_crash(
        seed in any::<u64>(),
        nodes in 5usize..120,
        fanout in 2u16..6,
        churn in prop::option::of(5.0f64..120.0),
        crash in 0.0f64..1.0,
        fixed in any::<bool>(),
        mass in prop::option::of((0.05f64..0.6, any::<bool>())),
        kill_root_children in any::<bool>(),
        latency in 5.0f64..150.0,
    ) {
        let cfg = Room {
            seed,
            nodes,
            fanout,
            churn,
            crash,
            fixed,
            mass,
            kill_root_children,
            latency,
        }
        .config();
        let r = run(&cfg);
        prop_assert_eq!(r.violations.cycles, 0, "{}", r);
        prop_assert_eq!(r.violations.over_capacity, 0, "{}", r);
        prop_assert_eq!(r.violations.unrepaired, 0, "{}", r);
        prop_assert_eq!(r.violations.bookkeeping, 0, "{}", r);
    }
}

/// Found by the property test (2026-11-25): after a 10% graceful mass departure and the loss of
/// all of the root's children, the only free slots were gone and the root's two slots were held
/// by weak peers, so a capacity-4 relay carrying two children was refused everywhere. A full
/// parent that knows no free slot now hands a leaf-only child over to such a relay.
#[test]
fn starved_relay_after_mass_departure_and_root_children_loss_is_repaired() {
    Room {
        seed: 693_389_432_427_306_580,
        nodes: 9,
        fanout: 2,
        churn: None,
        crash: 0.0,
        fixed: false,
        mass: Some((0.098_721_579_323_820_07, true)),
        kill_root_children: true,
        latency: 5.0,
    }
    .holds();
}

/// Found by the property test: a relay evicted by a live parent (the root) named it as its lost
/// parent in every repair request, and every member -- all below the root -- refused it as a
/// possible cycle. The guard now lapses after a short while.
#[test]
fn relay_evicted_by_a_live_parent_is_not_shut_out() {
    Room {
        seed: 11113519952782568304,
        nodes: 110,
        fanout: 5,
        churn: Some(42.450813477761585),
        crash: 0.7060946318779439,
        fixed: false,
        mass: None,
        kill_root_children: false,
        latency: 56.07849421261927,
    }
    .holds();
}

/// Found by the property test: concurrent repairs after losing the root's children, 110 ms links.
#[test]
fn root_children_loss_with_slow_links_closes_no_cycle() {
    Room {
        seed: 1638797593754739103,
        nodes: 104,
        fanout: 3,
        churn: Some(38.28479098007528),
        crash: 0.6787617339670905,
        fixed: false,
        mass: None,
        kill_root_children: true,
        latency: 109.36862916241869,
    }
    .holds();
}

/// Found by the property test: a directory that named slots of the recipient's own subtree let a
/// relay move below its own descendants on stale paths (a cycle).
#[test]
fn directories_never_name_the_recipients_subtree() {
    Room {
        seed: 13125061109457845193,
        nodes: 54,
        fanout: 2,
        churn: Some(43.923201620264464),
        crash: 0.36570870722997867,
        fixed: false,
        mass: None,
        kill_root_children: true,
        latency: 114.79290738120788,
    }
    .holds();
}

/// Found by the property test (`PROPTEST_RNG_SEED=22`): a departing relay named its parent as
/// successor to one child and that child as handover target to the other; the first skipped
/// its successor (it had refused a move lately), took a slot in its sibling's subtree without
/// naming the lost parent (it had no children -- until the sibling was handed over to it), and
/// closed a cycle. The plan of a departing parent now comes first and the guard covers every
/// orphan but a leaf handed over elsewhere.
#[test]
fn departure_plan_with_slow_links_closes_no_cycle() {
    Room {
        seed: 96_944_359_302_668_656,
        nodes: 83,
        fanout: 3,
        churn: Some(24.881_664_553_340_276),
        crash: 0.309_927_756_847_180_55,
        fixed: false,
        mass: None,
        kill_root_children: false,
        latency: 78.917_030_010_377_91,
    }
    .holds();
}

/// Found by the property test (`PROPTEST_RNG_SEED=24`): a 14% mass crash in a room of 79 with
/// fanout 2 left 4 viewers attached -- the root (2 slots), a capacity-1 relay and two leaf-only
/// viewers -- and no free slot among them; the other 65 never found a place (snapshots came back
/// empty). A member that knows no free slot now names the root, and the root makes room for a
/// newcomer or an orphan that can relay.
#[test]
fn a_room_starved_by_a_mass_crash_regrows() {
    Room {
        seed: 13_100_203_571_025_510_497,
        nodes: 79,
        fanout: 2,
        churn: None,
        crash: 0.0,
        fixed: false,
        mass: Some((0.137_988_935_806_469_23, false)),
        kill_root_children: false,
        latency: 103.961_245_390_299_4,
    }
    .holds();
}

/// A fanout-2 room with no churn that loses the root's children (several property-test finds).
fn fanout_two_root_children_lost(seed: u64, nodes: usize, latency: f64) -> Room {
    Room {
        seed,
        nodes,
        fanout: 2,
        churn: None,
        crash: 0.0,
        fixed: false,
        mass: None,
        kill_root_children: true,
        latency,
    }
}

/// Found by the property test (`PROPTEST_RNG_SEED=4`): 56 viewers, fanout 2, no churn; after
/// the root's children were killed, 48 viewers stayed detached (fixed with the case above).
#[test]
fn a_room_starved_by_losing_the_roots_children_regrows() {
    fanout_two_root_children_lost(10_851_841_148_705_529_423, 56, 13.968_917_525_153_627).holds();
}

/// Link latency of the next three property-test finds.
const LINKS_67_MS: f64 = 66.620_969_565_114_66;

/// Found by the property test (2026-11-25, fanout 2): after the loss of the root's children the
/// root's two slots were held by capacity-1 relays and four capacity-2 orphans were refused
/// everywhere (their only leaf-only competitors sat one level down). A starved parent now
/// gives a less capable child's slot, relay or not, to a joiner that can relay.
#[test]
fn a_relay_starved_behind_weaker_relays_is_repaired() {
    fanout_two_root_children_lost(14_216_910_030_848_085_968, 11, LINKS_67_MS).holds();
}

/// Found by the property test (2026-11-25, fanout 2): as above, but the root's children were as
/// capable as the orphan; the leaf-only peers whose slots it could take were two levels down. A
/// starved parent with no weaker child passes the request to one of its relay children.
#[test]
fn a_relay_starved_behind_equal_relays_is_repaired() {
    fanout_two_root_children_lost(14_216_910_030_848_085_980, 11, LINKS_67_MS).holds();
}

/// Shrunk from the case above: three leaf-only viewers and a root with two slots. One viewer
/// cannot be attached by any tree; the simulator does not count that as a failed repair.
#[test]
fn leaf_only_viewers_beyond_the_rooms_capacity_are_not_a_failed_repair() {
    let cfg = fanout_two_root_children_lost(14_216_910_030_848_085_980, 5, LINKS_67_MS).config();
    let r = run(&cfg);
    assert_eq!(r.violations.total(), 0, "{r}");
    assert!(r.attached_at_end < r.live_at_end, "{r}");
}

/// Found by the property test (2026-11-25): 7 s sessions, 63 % crashes, 136 ms links. A
/// capacity-8 orphan whose snapshots named only the root (nobody knew a free slot) kept asking
/// for snapshots for 30 s; like a newcomer, it now asks the root, which makes room for it.
#[test]
fn a_starved_orphan_that_can_relay_asks_the_root() {
    Room {
        seed: 1_592_576_269_865_460_194,
        nodes: 43,
        fanout: 4,
        churn: Some(7.122_970_677_234_368),
        crash: 0.631_045_858_540_455_8,
        fixed: false,
        mass: None,
        kill_root_children: false,
        latency: 135.780_243_950_269_75,
    }
    .holds();
}

/// Found by the property test (2026-11-25, no churn, 136 ms links): a promoted peer's least
/// capable child, sent to the former parent, was forwarded into a sibling's subtree while that
/// sibling, sent to the promoted peer, was forwarded into the child's: a cycle. The moves of a
/// promotion are now bounded strictly above the mover (but for the former parent's own, which
/// cannot be forwarded).
#[test]
fn a_promotion_with_slow_links_closes_no_cycle() {
    Room {
        seed: 11_672_371_703_294_552_302,
        nodes: 95,
        fanout: 4,
        churn: None,
        crash: 0.0,
        fixed: false,
        mass: None,
        kill_root_children: false,
        latency: 135.628_759_861_572_06,
    }
    .holds();
}

// ----- the room layer's rules, run by the simulator -----

/// A fifth of the arrivals vanish right after their first join request: their candidates accept
/// them and never hear from them again. The child-connect deadline drops each of them and frees
/// its slot; without it (a deadline too long to matter) the slots stay taken by ghosts.
#[test]
fn accepted_children_that_never_connect_are_dropped_and_their_slots_freed() {
    let cfg = SimConfig {
        nodes: 300,
        duration_secs: 120.0,
        churn_mean_secs: None,
        // Slowly enough that most ghosts find a free slot at their first request.
        join_rate_per_sec: 10.0,
        ghost_joiner_fraction: 0.2,
        seed: 21,
        ..SimConfig::default()
    };
    let r = run(&cfg);
    eprintln!("{r}");
    assert_eq!(r.violations.total(), 0, "{:?}", r.violations);
    assert!(r.crashes >= 30, "ghosts vanished: {}", r.crashes);
    let dropped = r.links_down.get("NeverConnected").copied().unwrap_or(0);
    assert!(dropped >= 20, "ghost children dropped: {:?}", r.links_down);
    assert_eq!(r.stale_children_at_end, 0);
    assert_eq!(r.attached_at_end, r.live_at_end);

    let without = run(&SimConfig {
        room: RoomTimings {
            child_connect_ms: 1_000_000_000,
            ..RoomTimings::default()
        },
        ..cfg
    });
    eprintln!("{without}");
    assert_eq!(without.links_down.get("NeverConnected"), None);
    assert!(
        without.stale_children_at_end >= 20,
        "without the deadline the ghosts keep their slots: {}",
        without.stale_children_at_end
    );
}

/// Tree edges' control connections close and reopen (both peers alive) about once a minute per
/// edge: every close is probed, every probe answered, and no edge is torn down.
#[test]
fn a_neighbour_that_answers_the_probe_is_kept() {
    let cfg = SimConfig {
        nodes: 300,
        duration_secs: 180.0,
        churn_mean_secs: None,
        connection_drops_per_edge_per_hour: 60.0,
        seed: 22,
        ..SimConfig::default()
    };
    let r = run(&cfg);
    eprintln!("{r}");
    assert_eq!(r.violations.total(), 0, "{:?}", r.violations);
    assert!(r.probes > 500, "probes: {}", r.probes);
    assert_eq!(r.probes_answered, r.probes);
    assert!(r.links_down.is_empty(), "{:?}", r.links_down);
    assert_eq!(r.attached_at_end, 300);
}

/// Crashes that only close the control connection: the neighbours probe, get no answer, and
/// declare the link down after the probe deadline; the tree repairs as usual, the outage longer
/// by the probe.
#[test]
fn a_neighbour_that_does_not_answer_the_probe_is_declared_down() {
    let base = SimConfig {
        nodes: 300,
        duration_secs: 300.0,
        churn_mean_secs: Some(200.0),
        crash_fraction: 0.5,
        seed: 23,
        ..SimConfig::default()
    };
    let probed = run(&SimConfig {
        crash_detection: CrashDetection::ConnectionClosed,
        ..base.clone()
    });
    eprintln!("{probed}");
    assert_eq!(probed.violations.total(), 0, "{:?}", probed.violations);
    let timeouts = probed.links_down.get("ProbeTimeout").copied().unwrap_or(0);
    assert!(timeouts >= 50, "{:?}", probed.links_down);
    assert_eq!(probed.links_down.get("Transport"), None);
    assert!(probed.probes >= timeouts);
    assert!(probed.attached_at_end * 100 >= probed.live_at_end * 99);
    let direct = run(&base);
    eprintln!("{direct}");
    assert!(direct.links_down.get("Transport").copied().unwrap_or(0) >= 50);
    // Half the departures are crashes, each costing its subtree the probe deadline more.
    assert!(
        probed.continuity >= 0.97 && probed.continuity >= direct.continuity - 0.02,
        "continuity: probed {}, direct {}",
        probed.continuity,
        direct.continuity
    );
    // The probe deadline (1.5 s) comes on top of the detection delay (0.5 to 1 s).
    assert!(
        probed.outage_crash_ms.p50 >= 2_000.0
            && probed.outage_crash_ms.p50 >= direct.outage_crash_ms.p50 + 1_000.0,
        "after a crash: probed p50 {} ms, direct p50 {} ms",
        probed.outage_crash_ms.p50,
        direct.outage_crash_ms.p50
    );
}

/// A tenth of the (child, parent) pairs cannot carry media (ICE never completes; both peers and
/// their control traffic are fine). The child gives such a parent up at its connect deadline,
/// tells it (so its slot frees at once), repairs elsewhere and does not come back to it: every
/// live viewer ends attached, nobody retries a pair it found unreachable. Without the child's
/// deadline the parent's own (later) deadline still frees the slot, but the child forgets the
/// path and comes back to it.
#[test]
fn a_parent_whose_media_never_connects_is_left_and_avoided() {
    let cfg = SimConfig {
        nodes: 300,
        duration_secs: 240.0,
        churn_mean_secs: Some(120.0),
        join_rate_per_sec: 20.0,
        unreachable_pair_fraction: 0.1,
        seed: 23,
        ..SimConfig::default()
    };
    let r = run(&cfg);
    eprintln!("{r}");
    assert_eq!(r.violations.total(), 0, "{:?}", r.violations);
    assert!(r.unreachable_attempts >= 20, "{}", r.unreachable_attempts);
    let given_up = r
        .links_down
        .get("ParentNeverConnected")
        .copied()
        .unwrap_or(0);
    assert!(given_up >= 20, "parents given up: {:?}", r.links_down);
    assert_eq!(
        r.unreachable_repeats, 0,
        "a child came back to a path that failed"
    );
    assert_eq!(r.stale_children_at_end, 0);
    // Arrivals go on to the end (churn): a newcomer may be mid-join at the last instant, but
    // nobody stays detached past the repair bound (`violations.unrepaired` above).
    assert!(
        r.live_at_end - r.attached_at_end <= 3,
        "{} of {} attached",
        r.attached_at_end,
        r.live_at_end
    );

    let without = run(&SimConfig {
        room: RoomTimings {
            parent_connect_ms: 1_000_000_000,
            unreachable_memory_ms: 0,
            ..RoomTimings::default()
        },
        ..cfg
    });
    eprintln!("{without}");
    assert_eq!(without.links_down.get("ParentNeverConnected"), None);
    assert!(
        without.unreachable_repeats > 0,
        "without the rule children come back to failed paths"
    );
}
