//! `tob-sim`: run the deterministic simulator over seeds, replay one, or check a history file.

use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tob_sim::checkers::check_history;
use tob_sim::history::History;
use tob_sim::{PLANTED_BUGS, Report, SimConfig, plant_bug, run};

const USAGE: &str = "\
usage:
  tob-sim --seeds A..B [--nodes 3|5] [--jobs N] [options]   run every seed in A..B (B excluded)
  tob-sim --seed N [--nodes 3|5] [--history FILE] [options]  run one seed, print its trace hash
  tob-sim check FILE [--nodes n1,n2,n3]                      check a history file
  tob-sim --list-bugs                                        list the planted bugs
options:
  --bug NAME          switch on a planted bug (needs the planted-bugs feature)
  --chaos-ms MS       length of the fault phase (default 5000)
  --clients N         client processes (default 6)
  --no-faults         no nemesis
  --verbose           print the nemesis log and statistics
  --keep-going        with --seeds: run every seed and count the failing ones
";

struct Args {
    seeds: Option<(u64, u64)>,
    seed: Option<u64>,
    nodes: usize,
    jobs: usize,
    history: Option<String>,
    bugs: Vec<String>,
    chaos_ms: Option<u64>,
    clients: Option<usize>,
    faults: bool,
    verbose: bool,
    keep_going: bool,
}

fn parse(mut argv: std::vec::IntoIter<String>) -> Result<Args, String> {
    let mut args = Args {
        seeds: None,
        seed: None,
        nodes: 3,
        jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        history: None,
        bugs: Vec::new(),
        chaos_ms: None,
        clients: None,
        faults: true,
        verbose: false,
        keep_going: false,
    };
    let number = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.ok_or_else(|| format!("{what} needs a value"))?
            .parse()
            .map_err(|_| format!("{what} needs a number"))
    };
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "--seeds" => {
                let v = argv.next().ok_or("--seeds needs A..B")?;
                let (a, b) = v.split_once("..").ok_or("--seeds needs A..B")?;
                let a: u64 = a.parse().map_err(|_| "--seeds needs numbers")?;
                let b: u64 = b.parse().map_err(|_| "--seeds needs numbers")?;
                if b <= a {
                    return Err("--seeds A..B needs A < B".into());
                }
                args.seeds = Some((a, b));
            }
            "--seed" => args.seed = Some(number(argv.next(), "--seed")?),
            "--nodes" => {
                args.nodes = number(argv.next(), "--nodes")? as usize;
                if args.nodes != 3 && args.nodes != 5 {
                    return Err("--nodes must be 3 or 5".into());
                }
            }
            "--jobs" => args.jobs = (number(argv.next(), "--jobs")? as usize).max(1),
            "--history" => args.history = Some(argv.next().ok_or("--history needs a file")?),
            "--bug" => args.bugs.push(argv.next().ok_or("--bug needs a name")?),
            "--chaos-ms" => args.chaos_ms = Some(number(argv.next(), "--chaos-ms")?),
            "--clients" => args.clients = Some(number(argv.next(), "--clients")?.max(1) as usize),
            "--no-faults" => args.faults = false,
            "--verbose" => args.verbose = true,
            "--keep-going" => args.keep_going = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.seeds.is_some() == args.seed.is_some() {
        return Err("give exactly one of --seeds A..B and --seed N".into());
    }
    Ok(args)
}

fn config(args: &Args, seed: u64) -> Result<SimConfig, String> {
    let mut config = SimConfig::new(seed);
    config.nodes = args.nodes;
    config.faults = args.faults;
    if let Some(ms) = args.chaos_ms {
        config.chaos_ns = ms * 1_000_000;
    }
    if let Some(clients) = args.clients {
        config.clients = clients;
    }
    for bug in &args.bugs {
        plant_bug(&mut config, bug)?;
    }
    Ok(config)
}

fn replay_command(args: &Args, seed: u64) -> String {
    let mut cmd = String::from("tob-sim");
    if !args.bugs.is_empty() {
        cmd = "cargo run --release -p tob-sim --features planted-bugs --".into();
    }
    cmd.push_str(&format!(" --seed {seed} --nodes {}", args.nodes));
    for bug in &args.bugs {
        cmd.push_str(&format!(" --bug {bug}"));
    }
    if let Some(ms) = args.chaos_ms {
        cmd.push_str(&format!(" --chaos-ms {ms}"));
    }
    if let Some(clients) = args.clients {
        cmd.push_str(&format!(" --clients {clients}"));
    }
    if !args.faults {
        cmd.push_str(" --no-faults");
    }
    cmd.push_str(&format!(" --history seed-{seed}.jsonl --verbose"));
    cmd
}

fn print_report(report: &Report, verbose: bool) {
    let s = &report.stats;
    if verbose {
        for line in &report.nemesis_log {
            println!("nemesis {line}");
        }
        println!(
            "stats: events {} ok {} fail {} info {} elections {} crashes {} wipes {} partitions {} \
             snapshots-installed {} commit {} reads {} reads-by-deposed-leader {}",
            s.events,
            s.ops_ok,
            s.ops_fail,
            s.ops_info,
            s.elections,
            s.crashes,
            s.wipes,
            s.partitions,
            s.snapshots_installed,
            s.max_commit,
            s.reads_served,
            s.reads_by_deposed_leader
        );
    }
    for v in &report.violations {
        println!("VIOLATION {v}");
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if argv.first().map(String::as_str) == Some("--list-bugs") {
        if !cfg!(feature = "planted-bugs") {
            println!(
                "(built without the planted-bugs feature: `cargo build -p tob-sim --features planted-bugs`)"
            );
        }
        for (name, what) in PLANTED_BUGS {
            println!("{name:<24} {what}");
        }
        return ExitCode::SUCCESS;
    }
    if argv.first().map(String::as_str) == Some("check") {
        return check_file(&argv[1..]);
    }
    let args = match parse(argv.into_iter()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("tob-sim: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(seed) = args.seed {
        let config = match config(&args, seed) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tob-sim: {e}");
                return ExitCode::from(2);
            }
        };
        let report = run(config);
        println!("seed: {seed}");
        println!("trace-hash: {:016x}", report.trace_hash);
        print_report(&report, args.verbose);
        if let Some(path) = &args.history {
            if let Err(e) = std::fs::write(path, report.history.to_jsonl()) {
                eprintln!("tob-sim: cannot write {path}: {e}");
                return ExitCode::from(2);
            }
            println!("history: {path} ({} events)", report.history.events.len());
        }
        return if report.violations.is_empty() {
            println!("ok");
            ExitCode::SUCCESS
        } else {
            println!("FAILED: replay with: {}", replay_command(&args, seed));
            ExitCode::FAILURE
        };
    }
    run_range(&args)
}

fn run_range(args: &Args) -> ExitCode {
    let (first, end) = args.seeds.expect("checked by parse");
    if let Err(e) = config(args, first) {
        eprintln!("tob-sim: {e}");
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let next = AtomicU64::new(first);
    let done = AtomicU64::new(0);
    let failed: Mutex<Option<(u64, Report)>> = Mutex::new(None);
    let failing_seeds: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let total = end - first;
    std::thread::scope(|scope| {
        for _ in 0..args.jobs {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= end
                        || failed.lock().expect("lock").as_ref().is_some_and(|(s, _)| *s < seed)
                    {
                        return;
                    }
                    let report = run(config(args, seed).expect("checked"));
                    if !report.violations.is_empty() && args.keep_going {
                        failing_seeds.lock().expect("lock").push(seed);
                    } else if !report.violations.is_empty() {
                        let mut f = failed.lock().expect("lock");
                        if f.as_ref().is_none_or(|(s, _)| seed < *s) {
                            *f = Some((seed, report));
                        }
                        return;
                    }
                    let n = done.fetch_add(1, Ordering::SeqCst) + 1;
                    if n.is_multiple_of(100) || n == total {
                        println!(
                            "{n}/{total} seeds passed ({:.1}s)",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
            });
        }
    });
    if args.keep_going {
        let mut seeds = failing_seeds.into_inner().expect("lock");
        seeds.sort_unstable();
        println!("{} of {total} seeds failed: {:?}", seeds.len(), &seeds[..seeds.len().min(30)]);
        return if seeds.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    match failed.into_inner().expect("lock") {
        Some((seed, report)) => {
            println!("seed {seed} FAILED ({} violations)", report.violations.len());
            print_report(&report, false);
            println!("replay with: {}", replay_command(args, seed));
            ExitCode::FAILURE
        }
        None => {
            println!(
                "all {total} seeds passed ({} nodes, {:.1}s)",
                args.nodes,
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
    }
}

fn check_file(argv: &[String]) -> ExitCode {
    let Some(path) = argv.first() else {
        eprintln!("tob-sim: check needs a file\n{USAGE}");
        return ExitCode::from(2);
    };
    let nodes: Vec<String> = match argv.get(1).map(String::as_str) {
        Some("--nodes") => {
            argv.get(2).map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tob-sim: cannot read {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let history = match History::from_jsonl(&text) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("tob-sim: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let violations = check_history(&history, &nodes);
    for v in &violations {
        println!("VIOLATION {v}");
    }
    if violations.is_empty() {
        println!("ok: {} events", history.events.len());
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
