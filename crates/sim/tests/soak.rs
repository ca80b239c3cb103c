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
