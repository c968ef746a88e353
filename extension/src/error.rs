//! Every way a tob call can fail inside PostgreSQL, each mapped to one SQLSTATE.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use tob_client::ClientError;
use tob_proto::{ErrorCode, OwnerInfo};

#[derive(Debug)]
pub enum TobError {
    /// The key is held (or pending/prepared in another transaction that then committed).
    Taken { namespace: String, key: String, current: OwnerInfo },
    /// Another row written by this transaction has the key (a `tob_unique` claim).
    TakenInTransaction { namespace: String, key: String },
    /// `tob.claim_wait = nowait`, or the wait outlasted `tob.claim_wait_timeout`.
    /// `releasing`: another transaction's release of the key was waited for, not its claim.
    WouldWait { namespace: String, key: String, current: OwnerInfo, waited: bool, releasing: bool },
    /// A claim of this transaction was lost before commit (its instance session expired).
    ClaimLost { keys: Vec<String> },
    /// No sequencer node could be reached.
    Unreachable(String),
    /// The cluster did not answer in time.
    Timeout,
    /// Interrupted by a cancel request or statement_timeout.
    Cancelled,
    /// A bad argument: NULL, empty, or malformed.
    BadArgument(String),
    /// An argument over a size limit.
    TooLong(String),
    /// Settings or set-up missing.
    NotConfigured(String),
    /// More than one transaction may do (messages staged for its commit).
    LimitExceeded(String),
    /// `tob_read` from before the oldest message the cluster keeps (`--messages-retained`);
    /// None when the node did not say which that is.
    Compacted { first_kept: Option<u64> },
    /// The namespace was never created (`tob_create_namespace`); empty when not known here.
    UnknownNamespace(String),
    /// The cluster refused the request for another reason.
    Refused { code: ErrorCode, message: String },
    /// `tob_unique` declared in a way it cannot work (arguments, timing, level, column).
    TriggerMisuse(String),
    /// `tob_unique` names a column the table does not have.
    UndefinedColumn(String),
}

impl From<ClientError> for TobError {
    fn from(error: ClientError) -> TobError {
        match error {
            ClientError::Unavailable(why) => TobError::Unreachable(why),
            ClientError::Timeout => TobError::Timeout,
            ClientError::Interrupted => TobError::Cancelled,
            ClientError::Refused { code: ErrorCode::TooLarge, message } => {
                TobError::TooLong(message)
            }
            ClientError::Refused { code: ErrorCode::Empty | ErrorCode::Malformed, message } => {
                TobError::BadArgument(message)
            }
            ClientError::Refused { code: ErrorCode::UnknownNamespace, .. } => {
                TobError::UnknownNamespace(String::new())
            }
            ClientError::Refused { code: ErrorCode::Compacted, message } => {
                TobError::Compacted { first_kept: tob_proto::compacted_first_kept(&message) }
            }
            ClientError::Refused { code, message } => TobError::Refused { code, message },
            ClientError::Protocol(why) => {
                TobError::Refused { code: ErrorCode::Malformed, message: why }
            }
        }
    }
}

impl TobError {
    /// Names the namespace in an unknown-namespace error of a call about `namespace`.
    pub fn in_namespace(self, namespace: &str) -> TobError {
        match self {
            TobError::UnknownNamespace(_) => TobError::UnknownNamespace(namespace.into()),
            other => other,
        }
    }

    /// The cluster answered with an error outcome, or with an outcome this call never gets.
    pub fn from_outcome(outcome: tob_proto::Outcome) -> TobError {
        match outcome {
            tob_proto::Outcome::Error { code } => {
                TobError::Refused { code, message: code.name().into() }
            }
            other => TobError::Refused {
                code: ErrorCode::Malformed,
                message: format!("unexpected answer {other:?}"),
            },
        }
    }

    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            TobError::Taken { .. } | TobError::TakenInTransaction { .. } => {
                ERRCODE_UNIQUE_VIOLATION
            }
            TobError::WouldWait { .. } => ERRCODE_LOCK_NOT_AVAILABLE,
            TobError::ClaimLost { .. } => ERRCODE_T_R_SERIALIZATION_FAILURE,
            TobError::Unreachable(_) => ERRCODE_CONNECTION_FAILURE,
            TobError::Timeout | TobError::Cancelled => ERRCODE_QUERY_CANCELED,
            TobError::BadArgument(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            TobError::TooLong(_) => ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            TobError::NotConfigured(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TobError::LimitExceeded(_) => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            TobError::UnknownNamespace(_) => ERRCODE_UNDEFINED_OBJECT,
            TobError::Compacted { .. } => ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
            TobError::Refused { code: ErrorCode::Overloaded, .. } => ERRCODE_INSUFFICIENT_RESOURCES,
            TobError::Refused { code: ErrorCode::NotLeader | ErrorCode::Unavailable, .. } => {
                ERRCODE_CONNECTION_FAILURE
            }
            TobError::Refused { .. } => ERRCODE_INTERNAL_ERROR,
            TobError::TriggerMisuse(_) => ERRCODE_TRIGGERED_ACTION_EXCEPTION,
            TobError::UndefinedColumn(_) => ERRCODE_UNDEFINED_COLUMN,
        }
    }

    fn message(&self) -> String {
        match self {
            TobError::Taken { namespace, key, .. }
            | TobError::TakenInTransaction { namespace, key } => {
                format!("tob: \"{key}\" is already claimed in namespace \"{namespace}\"")
            }
            TobError::WouldWait { namespace, key, waited: false, releasing: true, .. } => {
                format!(
                    "tob: \"{key}\" in namespace \"{namespace}\" is being released by another transaction"
                )
            }
            TobError::WouldWait { namespace, key, waited: false, .. } => format!(
                "tob: \"{key}\" in namespace \"{namespace}\" is pending in another transaction"
            ),
            TobError::WouldWait { namespace, key, waited: true, .. } => format!(
                "tob: gave up waiting for another transaction's claim on \"{key}\" in namespace \"{namespace}\" (tob.claim_wait_timeout)"
            ),
            TobError::ClaimLost { keys } => format!(
                "tob: this transaction's claim on {} was lost before commit",
                keys.join(", ")
            ),
            TobError::Unreachable(why) => format!("tob: cluster unreachable: {why}"),
            TobError::Timeout => {
                "tob: no answer from the cluster within tob.request_timeout".into()
            }
            TobError::Cancelled => "canceling statement due to user request".into(),
            TobError::BadArgument(why) | TobError::TooLong(why) => format!("tob: {why}"),
            TobError::NotConfigured(why) | TobError::LimitExceeded(why) => format!("tob: {why}"),
            TobError::TriggerMisuse(why) | TobError::UndefinedColumn(why) => {
                format!("tob_unique: {why}")
            }
            TobError::UnknownNamespace(namespace) if namespace.is_empty() => {
                "tob: namespace does not exist".into()
            }
            TobError::UnknownNamespace(namespace) => {
                format!("tob: namespace \"{namespace}\" does not exist")
            }
            TobError::Compacted { first_kept: Some(first) } => {
                format!("tob: the messages before seq {first} are no longer kept")
            }
            TobError::Compacted { first_kept: None } => {
                "tob: the messages asked for are no longer kept".into()
            }
            TobError::Refused { code, message } => {
                format!("tob: the cluster refused the request: {message} ({code})")
            }
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            TobError::Taken { current, .. } | TobError::WouldWait { current, .. } => Some(format!(
                "Owner \"{}\" holds it with fencing token {} (state {}).",
                current.owner,
                current.token.0,
                current.state.as_str()
            )),
            TobError::TakenInTransaction { .. } => {
                Some("Another row written by this transaction has the same value.".into())
            }
            TobError::ClaimLost { .. } => Some(
                "This instance's session with the cluster expired before commit, so the pending claims were released.".into(),
            ),
            TobError::Compacted { .. } => Some(
                "The cluster keeps only the latest messages (tob-sequencer --messages-retained) and trims older ones.".into(),
            ),
            _ => None,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            TobError::ClaimLost { .. } => Some("Retry the transaction.".into()),
            TobError::Compacted { first_kept: Some(first) } => Some(format!(
                "Read on from seq {first}: SELECT * FROM tob_read({first}, ...). The messages before it are gone."
            )),
            TobError::Unreachable(_) => {
                Some("Check tob.cluster and that the sequencer nodes run.".into())
            }
            TobError::WouldWait { waited: false, .. } => {
                Some("SET tob.claim_wait = wait to wait for the other transaction.".into())
            }
            TobError::UnknownNamespace(namespace) => Some(format!(
                "Declare it once for the whole cluster: SELECT tob_create_namespace('{}');",
                if namespace.is_empty() { "..." } else { namespace }
            )),
            TobError::TriggerMisuse(_) => Some(
                "CREATE TRIGGER ... AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW EXECUTE FUNCTION tob_unique('namespace', 'column'); and for TRUNCATE: BEFORE TRUNCATE ... FOR EACH STATEMENT with the same arguments.".into(),
            ),
            _ => None,
        }
    }

    /// Raises this error as a PostgreSQL ERROR; never returns.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.message(), "tob");
        if let Some(detail) = self.detail() {
            report = report.set_detail(detail);
        }
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}
