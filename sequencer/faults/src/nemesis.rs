//! The nemesis: a seeded schedule of faults over time, or one read from a small text file.
//!
//! Schedule file format, one step a line (`#` comments): `AT_MS ACTION [ARGS]`, actions
//! `kill N`, `wipe N` (kill -9 and delete its data directory: a lost disk), `restart N`,
//! `pause N`, `resume N`, `isolate N`, `cut A B` (one way),
//! `cut-clients N` (clients cannot reach node N),
//! `partition A,B` (those nodes against the rest), `bridge N` (node N still reaches everyone,
//! the others are split in two halves that cannot talk), `delay MS` (latency with ±50%
//! jitter on every link), `reset`, `restart-all`, `skew N TICK_MS` (restart node N with
//! another tick rate), `heal`. Nodes count from 0; `kill`, `pause` and `isolate` also take
//! `leader`: whichever node is leader when the step runs (repair those with `heal`).

use std::time::Duration;

/// In place of a node number: the node that is leader when the step runs.
pub const LEADER: usize = usize::MAX;

/// One fault or repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Kill(usize),
    /// kill -9 and delete the node's data directory; `Restart` brings it back blank.
    Wipe(usize),
    Restart(usize),
    Pause(usize),
    Resume(usize),
    Isolate(usize),
    Cut(usize, usize),
    /// Clients cannot reach node N (its peers still can).
    CutClients(usize),
    Partition(Vec<usize>),
    /// Node N reaches everyone; the others split into two halves that cannot talk.
    Bridge(usize),
    Delay(u64),
    Reset,
    RestartAll,
    Skew(usize, u64),
    Heal,
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Kill(_) => "kill",
            Action::Wipe(_) => "wipe",
            Action::Restart(_) => "restart",
            Action::Pause(_) => "pause",
            Action::Resume(_) => "resume",
            Action::Isolate(_) => "isolate",
            Action::Cut(..) => "cut",
            Action::CutClients(_) => "cut-clients",
            Action::Partition(_) => "partition",
            Action::Bridge(_) => "bridge",
            Action::Delay(_) => "delay",
            Action::Reset => "reset",
            Action::RestartAll => "restart-all",
            Action::Skew(..) => "skew",
            Action::Heal => "heal",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Kill(LEADER) | Action::Pause(LEADER) | Action::Isolate(LEADER) => {
                write!(f, "{} leader", self.kind())
            }
            Action::Kill(n)
            | Action::Wipe(n)
            | Action::Restart(n)
            | Action::Pause(n)
            | Action::Resume(n)
            | Action::Isolate(n)
            | Action::Bridge(n)
            | Action::CutClients(n) => write!(f, "{} {n}", self.kind()),
            Action::Cut(a, b) => write!(f, "cut {a} {b}"),
            Action::Partition(side) => write!(
                f,
                "partition {}",
                side.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")
            ),
            Action::Delay(ms) => write!(f, "delay {ms}"),
            Action::Skew(n, tick) => write!(f, "skew {n} {tick}"),
            _ => write!(f, "{}", self.kind()),
        }
    }
}

/// The seeded generator of the simulator and the consensus core: one seed, one schedule.
pub type Rng = tob_raft::SplitMix64;

/// A random schedule for `duration` on `nodes` nodes: a fault every 1–3 s, each repaired
/// 0.5–2.5 s later (pauses outlast the election timeout), ending healed. Faults: kill -9 and
/// restart (one in three with the data directory deleted: a lost disk), SIGSTOP/SIGCONT, an
/// isolated node — each also aimed at whichever node leads —, a bridge, a majority/minority
/// partition (5 nodes), a one-way cut, clients cut off from a node, added latency with
/// jitter, connection resets, every node restarted at once, a node restarted with a 30%
/// faster or slower tick.
pub fn random_schedule(seed: u64, duration: Duration, nodes: usize) -> Vec<(Duration, Action)> {
    let mut rng = Rng::new(seed);
    let mut steps = Vec::new();
    let end = duration.as_millis() as u64;
    let mut at = rng.range(500, 1500);
    while at + 500 < end {
        let n = rng.range(0, nodes as u64) as usize;
        let hold = rng.range(500, 2500).min(end - at);
        let (fault, repair) = match rng.range(0, 9) {
            0 if rng.range(0, 3) == 0 => (Action::Kill(LEADER), Action::Heal),
            1 if rng.range(0, 3) == 0 => (Action::Wipe(n), Action::Restart(n)),
            0 | 1 => (Action::Kill(n), Action::Restart(n)),
            2 if rng.range(0, 3) == 0 => (Action::Pause(LEADER), Action::Heal),
            2 | 3 => (Action::Pause(n), Action::Resume(n)),
            4 => (Action::Isolate([n, LEADER][rng.range(0, 2) as usize]), Action::Heal),
            5 if nodes >= 5 && rng.range(0, 2) == 0 => {
                let m = (n + 1 + rng.range(0, nodes as u64 - 1) as usize) % nodes;
                (Action::Partition(vec![n, m]), Action::Heal)
            }
            5 => (Action::Bridge(n), Action::Heal),
            6 if rng.range(0, 3) == 0 => (Action::CutClients(n), Action::Heal),
            6 => {
                let m = (n + 1 + rng.range(0, nodes as u64 - 1) as usize) % nodes;
                (Action::Cut(n, m), Action::Heal)
            }
            7 => (Action::Delay(rng.range(2, 30)), Action::Heal),
            _ => match rng.range(0, 4) {
                0 => (Action::RestartAll, Action::Heal),
                // Restarted with a clock 30% slow or fast: its lease bound must still hold.
                1 => (Action::Skew(n, [7, 13][rng.range(0, 2) as usize]), Action::Heal),
                _ => (Action::Reset, Action::Heal),
            },
        };
        steps.push((Duration::from_millis(at), fault));
        steps.push((Duration::from_millis(at + hold), repair));
        at += hold + rng.range(300, 1500);
    }
    steps.push((duration, Action::Heal));
    steps
}

/// Parses a schedule file (see the module documentation).
pub fn parse_schedule(text: &str) -> Result<Vec<(Duration, Action)>, String> {
    let mut steps = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {line}", number + 1);
        let words: Vec<&str> = line.split_whitespace().collect();
        let at: u64 = words[0].parse().map_err(|_| bad("time in ms expected"))?;
        let num = |i: usize| -> Result<u64, String> {
            words.get(i).and_then(|w| w.parse().ok()).ok_or_else(|| bad("number expected"))
        };
        let node = |i: usize| -> Result<usize, String> {
            if words.get(i) == Some(&"leader") { Ok(LEADER) } else { Ok(num(i)? as usize) }
        };
        let action = match words.get(1).copied() {
            Some("kill") => Action::Kill(node(2)?),
            Some("wipe") => Action::Wipe(num(2)? as usize),
            Some("restart") => Action::Restart(num(2)? as usize),
            Some("pause") => Action::Pause(node(2)?),
            Some("resume") => Action::Resume(num(2)? as usize),
            Some("isolate") => Action::Isolate(node(2)?),
            Some("bridge") => Action::Bridge(num(2)? as usize),
            Some("cut") => Action::Cut(num(2)? as usize, num(3)? as usize),
            Some("cut-clients") => Action::CutClients(num(2)? as usize),
            Some("partition") => Action::Partition(
                words
                    .get(2)
                    .ok_or_else(|| bad("nodes expected"))?
                    .split(',')
                    .map(|n| n.parse().map_err(|_| bad("node number expected")))
                    .collect::<Result<_, _>>()?,
            ),
            Some("delay") => Action::Delay(num(2)?),
            Some("reset") => Action::Reset,
            Some("restart-all") => Action::RestartAll,
            Some("skew") => Action::Skew(num(2)? as usize, num(3)?),
            Some("heal") => Action::Heal,
            _ => return Err(bad("unknown action")),
        };
        steps.push((Duration::from_millis(at), action));
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_schedules_are_reproducible_and_end_healed() {
        let a = random_schedule(7, Duration::from_secs(30), 3);
        assert_eq!(a, random_schedule(7, Duration::from_secs(30), 3));
        assert_ne!(a, random_schedule(8, Duration::from_secs(30), 3));
        assert_eq!(a.last().unwrap().1, Action::Heal);
        assert!(a.len() > 10);
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0), "in time order");
    }

    #[test]
    fn a_logged_schedule_reads_back_as_a_schedule_file() {
        let steps = random_schedule(3, Duration::from_secs(120), 3);
        let text: String =
            steps.iter().map(|(at, action)| format!("{} {action}\n", at.as_millis())).collect();
        assert_eq!(parse_schedule(&text).unwrap(), steps);
    }

    #[test]
    fn schedule_files_parse_and_bad_lines_are_named() {
        let steps = parse_schedule(
            "# a comment\n100 kill 1\n900 restart 1\n1000 partition 0,2\n2000 heal\n\
             2100 isolate leader\n2200 bridge 1\n2300 wipe 2\n",
        )
        .unwrap();
        assert_eq!(steps[0], (Duration::from_millis(100), Action::Kill(1)));
        assert_eq!(steps[2].1, Action::Partition(vec![0, 2]));
        assert_eq!(steps[4].1, Action::Isolate(LEADER));
        assert_eq!(steps[5].1, Action::Bridge(1));
        assert_eq!(steps[6].1, Action::Wipe(2));
        assert_eq!(steps[6].1.to_string(), "wipe 2");
        assert_eq!(steps[4].1.to_string(), "isolate leader");
        let err = parse_schedule("100 explode 1").unwrap_err();
        assert!(err.contains("line 1") && err.contains("unknown action"), "{err}");
    }
}
