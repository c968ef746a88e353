//! `tob-faults run --duration D --seed N --out DIR [--workload NAME] [--schedule FILE]
//! [--nodes 3|5] [--sequencer PATH]`: attacks a real cluster, writes `DIR/history.jsonl`,
//! `DIR/nemesis.log` and `DIR/summary.json`, exits 1 on any anomaly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tob_faults::{RunConfig, default_sequencer, nemesis, run};

const USAGE: &str = "usage: tob-faults run --duration D --seed N --out DIR [--workload mixed|claims|appends|counter|usernames|fencing] [--schedule FILE] [--nodes N] [--sequencer PATH] [--planted-bug NAME] [--think-ms MS]
  D is seconds, or with a unit: 90s, 2m, 1h; MS is each client's mean pause between operations (default 5)
  usernames and fencing run through two PostgreSQL 15 servers with the tob extension (installed by ./scripts/install-extension.sh)";

fn duration(text: &str) -> Option<Duration> {
    let (number, unit) =
        text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) != Some("run") {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let mut config = RunConfig {
        sequencer: default_sequencer(),
        out: PathBuf::from("faults-out"),
        duration: Duration::from_secs(60),
        seed: 1,
        workload: "mixed".into(),
        schedule: None,
        nodes: 3,
        sequencer_flags: Vec::new(),
        think: Duration::from_millis(5),
    };
    let mut schedule_file = None;
    let mut args = argv[1..].iter();
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            eprintln!("tob-faults: {flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        let ok = match flag.as_str() {
            "--duration" => duration(value).map(|d| config.duration = d).is_some(),
            "--seed" => value.parse().map(|s| config.seed = s).is_ok(),
            "--out" => {
                config.out = PathBuf::from(value);
                true
            }
            "--workload" => {
                config.workload = value.clone();
                ["mixed", "claims", "appends", "counter", "usernames", "fencing"]
                    .contains(&value.as_str())
            }
            "--schedule" => {
                schedule_file = Some(value.clone());
                true
            }
            "--nodes" => value.parse().map(|n| config.nodes = n).is_ok() && config.nodes >= 3,
            "--think-ms" => {
                value.parse().map(|ms| config.think = Duration::from_millis(ms)).is_ok()
            }
            "--planted-bug" => {
                config.sequencer_flags.extend(["--planted-bug".to_owned(), value.clone()]);
                true
            }
            "--sequencer" => {
                config.sequencer = PathBuf::from(value);
                true
            }
            _ => false,
        };
        if !ok {
            eprintln!("tob-faults: bad {flag} {value}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    if let Some(path) = &schedule_file {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| nemesis::parse_schedule(&t))
        {
            Ok(steps) => config.schedule = Some(steps),
            Err(e) => {
                eprintln!("tob-faults: {path}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if !config.sequencer.exists() {
        eprintln!(
            "tob-faults: no tob-sequencer at {} (use --sequencer)",
            config.sequencer.display()
        );
        return ExitCode::from(2);
    }
    let summary = match run(&config) {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("tob-faults: {e}");
            return ExitCode::from(70);
        }
    };
    println!("{}", serde_json::to_string_pretty(&summary.json).unwrap_or_default());
    let replay = format!(
        "tob-faults run --duration {}s --seed {} --out {} --workload {}{}",
        config.duration.as_secs(),
        config.seed,
        config.out.display(),
        config.workload,
        schedule_file.map(|f| format!(" --schedule {f}")).unwrap_or_default()
    );
    println!("replay the same schedule: {replay}");
    println!(
        "or replay the faults as they happened: tob-faults run --schedule {}/nemesis.log --duration {}s --workload {} --out DIR",
        config.out.display(),
        config.duration.as_secs(),
        config.workload
    );
    println!(
        "check the history again:  tob-sim check {}/history.jsonl --nodes {}",
        config.out.display(),
        (1..=config.nodes).map(|i| format!("n{i}")).collect::<Vec<_>>().join(",")
    );
    if summary.anomalies.is_empty() {
        println!("no anomalies");
        ExitCode::SUCCESS
    } else {
        for a in &summary.anomalies {
            println!("ANOMALY {a}");
        }
        ExitCode::from(1)
    }
}
