//! The starts ("boots") of one PostgreSQL server, and the first transaction id each could
//! hand out: what the extension's reconciler needs to trust `pg_xact_status` after a crash.
//!
//! A claim made inside a transaction is held in the cluster under `pg:<system id>:<boot>:<xid>`
//! and its fate is the transaction's, read back from PostgreSQL's commit log. After a crash,
//! PostgreSQL hands out ids again from the first one past everything its WAL shows (the
//! boot's *first id*). A transaction that claimed a name but had written nothing durable yet
//! (the trigger claims before the row is written) leaves an id that is handed out again, to
//! an unrelated transaction whose fate the commit log then reports. Rather than flush a WAL
//! record before every claim so the id can never be reused (a second WAL flush per
//! transaction, and a quarter of the throughput on this machine), the holder names the boot
//! that assigned the id, and:
//!
//! - an id of the current boot: the commit log speaks for it;
//! - an id of an earlier boot, below the first id of the boot after it: never handed out
//!   again, so the commit log speaks for it too;
//! - an id of an earlier boot at or past that first id: its transaction cannot have committed
//!   (its commit record would be in the WAL, and the next boot would start past it): aborted.
//!
//! The first id of a boot is known exactly in two places: the checkpoint in `pg_control` when
//! the server starts without replaying WAL (a clean shutdown, or a crash right after a
//! checkpoint), and the next id at the end of WAL replay. The registry is written before the
//! server starts (a *provisional* entry from `pg_control`) and amended when replay ends
//! (*final*). A provisional entry followed by one with the same checkpoint is a start whose
//! replay never finished: it served nothing and its id is only a lower bound, so it is skipped.

use std::fmt;

/// One start of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// 1 for the first start the registry saw, then counting up.
    pub number: u64,
    /// The first (full) transaction id this start could hand out.
    pub first_xid: u64,
    /// The checkpoint `pg_control` named when the server started (its WAL position).
    pub checkpoint_lsn: u64,
    pub first_xid_is: FirstXid,
}

/// How far `Boot::first_xid` can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstXid {
    /// The checkpoint's next id, written before WAL replay: exact if replay found nothing to
    /// do, a lower bound while replay runs.
    Provisional,
    /// After a clean shutdown (nothing to replay) or at the end of replay: exact.
    Final,
}

/// What the commit log may be trusted with for one holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The id was never handed out again: `pg_xact_status` is the transaction's fate.
    AskCommitLog,
    /// The id is past everything the next start found in the WAL: the transaction never
    /// committed.
    Aborted,
    /// The boot is not in the registry (or there is no start after it): leave the claims in
    /// flight and say so.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Every start of the server, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    pub boots: Vec<Boot>,
}

const HEADER: &str = "# tob: starts of this server (boot, first transaction id, checkpoint, provisional|final)\n# Written by the tob extension; the reconciler needs it after a crash. Do not edit.\n";

impl Registry {
    /// Reads the file's text. Comment lines start with `#`.
    pub fn parse(text: &str) -> Result<Registry, ParseError> {
        let mut boots: Vec<Boot> = Vec::new();
        for (at, line) in text.lines().enumerate() {
            let line_number = at + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: &str| ParseError { line: line_number, message: message.into() };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [number, first_xid, checkpoint_lsn, state] = fields[..] else {
                return Err(bad("expected four fields"));
            };
            let number: u64 = number.parse().map_err(|_| bad("bad boot number"))?;
            let first_xid: u64 = first_xid.parse().map_err(|_| bad("bad transaction id"))?;
            let checkpoint_lsn =
                parse_lsn(checkpoint_lsn).ok_or_else(|| bad("bad WAL position"))?;
            let first_xid_is = match state {
                "provisional" => FirstXid::Provisional,
                "final" => FirstXid::Final,
                _ => return Err(bad("expected provisional or final")),
            };
            if boots.last().is_some_and(|last| last.number >= number) {
                return Err(bad("boot numbers must grow"));
            }
            boots.push(Boot { number, first_xid, checkpoint_lsn, first_xid_is });
        }
        Ok(Registry { boots })
    }

    pub fn render(&self) -> String {
        let mut text = String::from(HEADER);
        for boot in &self.boots {
            let state = match boot.first_xid_is {
                FirstXid::Provisional => "provisional",
                FirstXid::Final => "final",
            };
            text.push_str(&format!(
                "{} {} {} {state}\n",
                boot.number,
                boot.first_xid,
                format_lsn(boot.checkpoint_lsn)
            ));
        }
        text
    }

    /// Records a new start, from `pg_control` as it is before any WAL replay; returns its
    /// number.
    pub fn begin(&mut self, checkpoint_lsn: u64, checkpoint_next_xid: u64, clean: bool) -> u64 {
        let number = self.boots.last().map_or(1, |b| b.number + 1);
        let first_xid_is = if clean { FirstXid::Final } else { FirstXid::Provisional };
        self.boots.push(Boot {
            number,
            first_xid: checkpoint_next_xid,
            checkpoint_lsn,
            first_xid_is,
        });
        number
    }

    /// WAL replay of start `number` ended with `next_xid` as the next id to hand out.
    pub fn finish(&mut self, number: u64, next_xid: u64) -> Result<(), String> {
        match self.boots.last_mut() {
            Some(last) if last.number == number => {
                last.first_xid = next_xid;
                last.first_xid_is = FirstXid::Final;
                Ok(())
            }
            _ => Err(format!("start {number} is not the latest one in the registry")),
        }
    }

    /// The first id of the start after `number` that served anything.
    fn first_xid_after(&self, number: u64) -> Option<u64> {
        let at = self.boots.iter().position(|b| b.number == number)?;
        let later = &self.boots[at + 1..];
        later.iter().enumerate().find_map(|(i, boot)| {
            let replay_never_finished = boot.first_xid_is == FirstXid::Provisional
                && later.get(i + 1).is_some_and(|next| next.checkpoint_lsn == boot.checkpoint_lsn);
            (!replay_never_finished).then_some(boot.first_xid)
        })
    }

    /// Whether the commit log speaks for transaction `xid` of start `boot`, seen from start
    /// `current`.
    pub fn fate(&self, current: u64, boot: u64, xid: u64) -> Fate {
        if boot == current {
            return Fate::AskCommitLog;
        }
        if boot > current {
            return Fate::Unknown;
        }
        match self.first_xid_after(boot) {
            Some(first) if xid >= first => Fate::Aborted,
            Some(_) => Fate::AskCommitLog,
            None => Fate::Unknown,
        }
    }
}

/// The parts of a transaction holder id after `pg:<system id>:`. Ordered by start, then
/// transaction id: a transaction that began after another committed comes later (its id was
/// handed out later, in the same start or a later one), which is the order the reconciler
/// settles in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TransactionHolder {
    /// None for holders written before boots were recorded (their ids were flushed to the WAL
    /// before the claim, so the commit log speaks for them).
    pub boot: Option<u64>,
    pub full_xid: u64,
}

impl TransactionHolder {
    pub fn render(boot: u64, full_xid: u64) -> String {
        format!("{boot}:{full_xid}")
    }

    pub fn parse(rest: &str) -> Option<TransactionHolder> {
        match rest.split_once(':') {
            Some((boot, xid)) => Some(TransactionHolder {
                boot: Some(boot.parse().ok()?),
                full_xid: xid.parse().ok()?,
            }),
            None => Some(TransactionHolder { boot: None, full_xid: rest.parse().ok()? }),
        }
    }
}

/// PostgreSQL's `X/Y` notation for a WAL position.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    (high <= 0xFFFF_FFFF && low <= 0xFFFF_FFFF).then_some((high << 32) | low)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_order_by_start_then_transaction_id_not_as_text() {
        let mut holders: Vec<TransactionHolder> = ["2:5", "1:1000", "1:999", "7"]
            .iter()
            .map(|h| TransactionHolder::parse(h).unwrap())
            .collect();
        holders.sort();
        let rendered: Vec<String> = holders
            .iter()
            .map(|h| match h.boot {
                Some(boot) => TransactionHolder::render(boot, h.full_xid),
                None => h.full_xid.to_string(),
            })
            .collect();
        assert_eq!(rendered, ["7", "1:999", "1:1000", "2:5"]);
    }

    /// Starts as (number, first id, checkpoint, provisional or final).
    fn registry(boots: &[(u64, u64, u64, FirstXid)]) -> Registry {
        let boots = boots
            .iter()
            .map(|&(number, first_xid, checkpoint_lsn, first_xid_is)| Boot {
                number,
                first_xid,
                checkpoint_lsn,
                first_xid_is,
            })
            .collect();
        Registry { boots }
    }

    #[test]
    fn the_file_reads_back_what_was_written_and_refuses_damage() {
        let mut registry = Registry::default();
        assert_eq!(registry.begin(0x1_0000_0028, 740, true), 1);
        assert_eq!(registry.begin(0x1_0000_2000, 800, false), 2);
        registry.finish(2, 815).unwrap();
        assert_eq!(registry.begin(0x1_0000_3000, 900, false), 3);
        let text = registry.render();
        assert!(text.contains("1 740 1/28 final\n2 815 1/2000 final\n3 900 1/3000 provisional\n"));
        assert_eq!(Registry::parse(&text).unwrap(), registry);

        for (damaged, line) in [
            ("1 740 1/28\n", 1),
            ("1 740 1/28 final\nx 800 1/30 final\n", 2),
            ("1 740 1/28 final\n2 800 zz final\n", 2),
            ("1 740 1/28 final\n2 800 1/30 maybe\n", 2),
            ("2 740 1/28 final\n2 800 1/30 final\n", 2),
        ] {
            assert_eq!(Registry::parse(damaged).unwrap_err().line, line, "{damaged:?}");
        }
        assert_eq!(Registry::parse("").unwrap(), Registry::default());
    }

    #[test]
    fn only_the_latest_start_is_finished() {
        let mut registry = Registry::default();
        registry.begin(10, 100, false);
        registry.begin(20, 100, false);
        assert!(registry.finish(1, 120).is_err());
        registry.finish(2, 120).unwrap();
        assert_eq!(registry.boots[1].first_xid, 120);
        assert_eq!(registry.boots[1].first_xid_is, FirstXid::Final);
    }

    #[test]
    fn an_id_past_the_next_start_never_committed_and_one_below_it_asks_the_commit_log() {
        use FirstXid::*;
        let registry = registry(&[(1, 100, 10, Final), (2, 150, 20, Final), (3, 170, 30, Final)]);
        // The current start: always the commit log.
        assert_eq!(registry.fate(3, 3, 10_000), Fate::AskCommitLog);
        // Start 1's ids below 150 were never handed out again; 150 and up were.
        assert_eq!(registry.fate(3, 1, 149), Fate::AskCommitLog);
        assert_eq!(registry.fate(3, 1, 150), Fate::Aborted);
        assert_eq!(registry.fate(3, 1, 160), Fate::Aborted);
        assert_eq!(registry.fate(3, 2, 169), Fate::AskCommitLog);
        assert_eq!(registry.fate(3, 2, 170), Fate::Aborted);
        // Not recorded, or from the future: nobody can say.
        assert_eq!(registry.fate(3, 7, 1), Fate::Unknown);
        assert_eq!(registry.fate(2, 3, 1), Fate::Unknown);
        assert_eq!(Registry::default().fate(1, 0, 5), Fate::Unknown);
    }

    #[test]
    fn a_start_whose_replay_never_finished_is_skipped_but_one_that_replayed_nothing_counts() {
        use FirstXid::*;
        // Start 2 died during WAL replay: its entry still holds the checkpoint's id (a lower
        // bound, 150) and start 3 began from the same checkpoint and replayed to 180. Ids
        // 150..180 of start 1 may have committed: they must go to the commit log.
        let replay_died = registry(&[
            (1, 100, 10, Final),
            (2, 150, 20, Provisional),
            (3, 180, 20, Final),
            (4, 200, 40, Final),
        ]);
        assert_eq!(replay_died.fate(4, 1, 160), Fate::AskCommitLog);
        assert_eq!(replay_died.fate(4, 1, 180), Fate::Aborted);
        // Start 2 crashed right after a checkpoint, replayed nothing, served, and crashed
        // again: its checkpoint id is exact and start 3 began from a newer checkpoint.
        let replayed_nothing =
            registry(&[(1, 100, 10, Final), (2, 150, 20, Provisional), (3, 170, 30, Provisional)]);
        assert_eq!(replayed_nothing.fate(3, 1, 149), Fate::AskCommitLog);
        assert_eq!(replayed_nothing.fate(3, 1, 150), Fate::Aborted);
        assert_eq!(replayed_nothing.fate(3, 2, 169), Fate::AskCommitLog);
        assert_eq!(replayed_nothing.fate(3, 2, 170), Fate::Aborted);
        // Two replays in a row that never finished.
        let twice = registry(&[
            (1, 100, 10, Final),
            (2, 150, 20, Provisional),
            (3, 150, 20, Provisional),
            (4, 190, 20, Final),
        ]);
        assert_eq!(twice.fate(4, 1, 185), Fate::AskCommitLog);
        assert_eq!(twice.fate(4, 1, 190), Fate::Aborted);
    }

    #[test]
    fn holders_name_their_start_and_old_ones_still_parse() {
        assert_eq!(
            TransactionHolder::parse(&TransactionHolder::render(3, 751)),
            Some(TransactionHolder { boot: Some(3), full_xid: 751 })
        );
        assert_eq!(
            TransactionHolder::parse("751"),
            Some(TransactionHolder { boot: None, full_xid: 751 })
        );
        for bad in ["", "x", "3:", ":5", "3:5:7", "-1"] {
            assert_eq!(TransactionHolder::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn wal_positions_use_postgresql_notation() {
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        for bad in ["", "1", "1/", "/1", "G/1", "100000000/0"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }
}
