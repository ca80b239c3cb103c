//! Randomized soak in CI: 200 seeds of random faults against 3- and 5-node clusters.
//! `cargo run -p sim --release -- soak --seeds 100000` runs many more; a failing seed is
//! replayed with `cargo run -p sim --release -- replay --seed N`.

#[test]
fn soak_200_random_schedules() {
    let start = sim::seed_or(0);
    let mut committed = 0;
    let mut crashes = 0;
    let mut worst_recovery = 0;
    for seed in start..start + 200 {
        let r = sim::soak::run(seed, false);
        assert!(
            r.checks > 0 && r.committed > 0,
            "seed {seed}: {} safety checks, {} commits",
            r.checks,
            r.committed
        );
        committed += r.committed;
        crashes += r.crashes;
        worst_recovery = worst_recovery.max(r.recovery_ms);
    }
    // The schedules must actually exercise the cluster.
    assert!(
        committed > 50_000,
        "only {committed} commands committed over 200 seeds"
    );
    assert!(crashes > 100, "only {crashes} crashes over 200 seeds");
    eprintln!("200 seeds: {committed} commands committed, {crashes} crashes, worst recovery {worst_recovery} ms");
}

/// The same schedules with the membership nemesis: nodes added as learners or voters,
/// promoted, removed (the leader too), destroyed once their removal committed, and voters
/// swapped in joint changes — at random moments, racing with crashes, partitions, loss and
/// reordering. Every commit is checked durable on a majority of each configuration in force.
/// `cargo run -p sim --release -- soak --membership --seeds 100000` runs many more.
#[test]
fn membership_soak_200_random_schedules() {
    let start = sim::seed_or(0);
    let (mut changes, mut added, mut committed) = (0, 0, 0);
    for seed in start..start + 200 {
        let opts = sim::soak::Options {
            membership: true,
            ..Default::default()
        };
        let r = sim::soak::run_with(seed, opts);
        assert!(
            r.checks > 0 && r.committed > 0,
            "seed {seed}: nothing checked"
        );
        changes += r.conf_changes;
        added += r.nodes_added;
        committed += r.committed;
    }
    assert!(
        changes > 1_000,
        "only {changes} configuration changes over 200 seeds"
    );
    assert!(added > 300, "only {added} nodes added over 200 seeds");
    eprintln!("200 seeds: {changes} configuration changes, {added} nodes added, {committed} commands committed");
}
