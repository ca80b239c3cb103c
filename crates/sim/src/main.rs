//! `sim`: run the simulator from the command line.
//!
//! - `sim demo`: a 5-node cluster under faults, with a summary of what happened;
//! - `sim soak --seeds N`: N random schedules, in parallel, stopping at the first failure;
//! - `sim replay --seed S`: one soak seed again, printing every event;
//! - `sim system --seeds N`: the whole system (driver + kv store) under faults, with every
//!   client history checked for linearizability; `--seed S --trace` replays one.

use clap::{Parser, Subcommand};
use sim::soak;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Deterministic simulator for the raftkv consensus core")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a cluster under random faults and print a summary.
    Demo {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Fault phases (each 50–1500 virtual ms).
        #[arg(long, default_value_t = 40)]
        phases: u64,
        /// Change the membership too (add, promote, remove, joint swaps).
        #[arg(long)]
        membership: bool,
    },
    /// Run many random seeds; any failure prints the seed and how to replay it.
    Soak {
        #[arg(long, default_value_t = 1_000)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Worker threads (default: available cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Add the membership nemesis (add, promote, remove, replace, joint swaps).
        #[arg(long)]
        membership: bool,
    },
    /// The whole system: production driver and kv store, clients, linearizability.
    System {
        #[arg(long, default_value_t = 1_000)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Run only this seed and print its summary.
        #[arg(long)]
        seed: Option<u64>,
        /// With --seed: print every event.
        #[arg(long)]
        trace: bool,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Replay one seed, printing every event.
    Replay {
        #[arg(long)]
        seed: u64,
        /// Print only the summary, not every event.
        #[arg(long)]
        quiet: bool,
        /// The seed was a membership soak seed.
        #[arg(long)]
        membership: bool,
    },
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Demo {
            seed,
            nodes,
            phases,
            membership,
        } => {
            if !(1..=9).contains(&nodes) {
                eprintln!("--nodes must be between 1 and 9");
                std::process::exit(2);
            }
            let opts = soak::Options {
                nodes: Some(nodes),
                phases: Some(phases),
                trace: false,
                membership,
            };
            print_report(&soak::run_with(seed, opts));
        }
        Cmd::Replay {
            seed,
            quiet,
            membership,
        } => {
            let opts = soak::Options {
                trace: !quiet,
                membership,
                ..Default::default()
            };
            print_report(&soak::run_with(seed, opts));
        }
        Cmd::Soak {
            seeds,
            start,
            threads,
            membership,
        } => soak_many(start, seeds, threads, move |seed| {
            let opts = soak::Options {
                membership,
                ..Default::default()
            };
            soak::run_with(seed, opts);
        }),
        Cmd::System {
            seed: Some(seed),
            trace,
            ..
        } => println!("{:?}", sim::system::soak(seed, trace)),
        Cmd::System {
            seeds,
            start,
            threads,
            ..
        } => soak_many(start, seeds, threads, |seed| {
            let r = sim::system::soak(seed, false);
            if r.inconclusive {
                eprintln!("seed {seed}: linearizability search inconclusive (budget)");
            }
        }),
    }
}

fn print_report(r: &soak::Report) {
    println!(
        "seed {}: {}-node cluster, {:.1} virtual seconds, {} events",
        r.seed,
        r.nodes,
        r.virtual_ms as f64 / 1000.0,
        r.events
    );
    println!(
        "  faults:    {} crashes, {} restarts, {} partitions, {} heals; {} lossy phases ({} with long reordering)",
        r.crashes, r.restarts, r.partitions, r.heals, r.lossy_phases, r.reordering_phases
    );
    println!("  elections: {} terms had a leader", r.terms_with_leader);
    if r.conf_changes + r.nodes_added > 0 {
        println!(
            "  members:   {} configuration changes accepted, {} nodes added, {} destroyed",
            r.conf_changes, r.nodes_added, r.destroyed
        );
    }
    println!(
        "  clients:   {} proposals, {} committed, {} linearizable reads served",
        r.proposals, r.committed, r.reads_served
    );
    println!("  network:   {} messages, {} bytes", r.messages, r.bytes);
    println!("  safety:    {} invariant checks passed", r.checks);
    println!(
        "  liveness:  after healing, a leader and 5 new commits within {} ms",
        r.recovery_ms
    );
}

fn soak_many(
    start: u64,
    seeds: u64,
    threads: Option<usize>,
    run: impl Fn(u64) + Sync + std::panic::RefUnwindSafe,
) {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = AtomicU64::new(start);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let began = Instant::now();
    // A violation panics inside `soak::run` with the seed and replay command.
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= start + seeds || failed.load(Ordering::Relaxed) {
                    break;
                }
                let ok = std::panic::catch_unwind(|| run(seed)).is_ok();
                if !ok {
                    failed.store(true, Ordering::Relaxed);
                    break;
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 1_000 == 0 {
                    eprintln!("{n} seeds passed ({:.0?})", began.elapsed());
                }
            });
        }
    });
    if failed.load(Ordering::Relaxed) {
        eprintln!("FAILED (see the panic above for the seed and replay command)");
        std::process::exit(1);
    }
    println!(
        "{} seeds passed in {:.1?}",
        done.load(Ordering::Relaxed),
        began.elapsed()
    );
}
