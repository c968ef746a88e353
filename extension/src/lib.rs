//! `tob`: global unique claims, fencing tokens and totally ordered messages from SQL.
//!
//! Thin entry points over the modules: `xact` (claims inside transactions), `worker` (the
//! instance session and reconciler), `boots` (the server's starts, for the reconciler),
//! `backend` (this backend's client), `guc`, `error`.

use pgrx::prelude::*;
use tob_proto::Seq;

mod backend;
mod boots;
mod error;
mod guc;
mod locks;
mod shmem;
mod worker;
mod xact;

use backend::with_client;
use error::TobError;

pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::define();
    xact::register_callbacks();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        boots::register();
        worker::register();
    }
}

const KEY_BYTES_MAX: usize = 1024;
const NAME_BYTES_MAX: usize = 256;

/// A message's payload: not NULL (empty is fine), within the cluster's limit on one request.
fn checked_payload(payload: Option<&str>) -> &str {
    let Some(payload) = payload else {
        TobError::BadArgument("payload must not be NULL".into()).raise()
    };
    within("payload", payload, tob_proto::Limits::default().payload_bytes_max)
}

/// Checks an argument the way the cluster would, so bad input fails before any network call.
fn checked<'a>(what: &str, value: Option<&'a str>, max: usize) -> &'a str {
    let Some(value) = value else {
        TobError::BadArgument(format!("{what} must not be NULL")).raise()
    };
    if value.is_empty() {
        TobError::BadArgument(format!("{what} must not be empty")).raise()
    }
    within(what, value, max)
}

/// `value` if it is at most `max` bytes long; 22001 naming `what` otherwise.
fn within<'a>(what: &str, value: &'a str, max: usize) -> &'a str {
    if value.len() > max {
        TobError::TooLong(format!(
            "{what} is {} bytes long; at most {max} are allowed",
            value.len()
        ))
        .raise()
    }
    value
}

fn owner_or_default(owner: Option<&str>) -> String {
    match owner {
        Some(owner) => checked("owner", Some(owner), NAME_BYTES_MAX).to_owned(),
        None => backend::default_owner(),
    }
}

/// Claims `key` in `namespace` for `owner` (default: this server and database) inside the
/// current transaction. Returns the fencing token. Final when the transaction commits;
/// released if it aborts.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_claim(
    namespace: Option<&str>,
    key: Option<&str>,
    owner: default!(Option<&str>, "NULL"),
) -> i64 {
    let namespace = checked("namespace", namespace, NAME_BYTES_MAX);
    let key = checked("key", key, KEY_BYTES_MAX);
    let owner = owner_or_default(owner);
    xact::claim(namespace, key, &owner, None).0 as i64
}

/// Releases `owner`'s claim on `key` when the current transaction commits. Returns false if
/// `owner` does not hold it.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_release(
    namespace: Option<&str>,
    key: Option<&str>,
    owner: default!(Option<&str>, "NULL"),
) -> bool {
    let namespace = checked("namespace", namespace, NAME_BYTES_MAX);
    let key = checked("key", key, KEY_BYTES_MAX);
    let owner = owner_or_default(owner);
    xact::release(namespace, key, &owner)
}

/// The current owner of a key, read as `tob.read_consistency` says: no row if it is free.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_owner(
    namespace: Option<&str>,
    key: Option<&str>,
) -> TableIterator<'static, (name!(owner, String), name!(token, i64), name!(state, String))> {
    let namespace = checked("namespace", namespace, NAME_BYTES_MAX);
    let key = checked("key", key, KEY_BYTES_MAX);
    // A trigger of the same statement may have claimed it for a row (sent at its end).
    xact::send_row_ops();
    let consistency = guc::read_consistency();
    let current = with_client(|c| {
        c.owner(namespace, key, consistency).map_err(|e| TobError::from(e).in_namespace(namespace))
    });
    TableIterator::new(current.map(|o| (o.owner, o.token.0 as i64, o.state.as_str().to_owned())))
}

/// Appends a message to the total order (not transactional: like nextval, it stays when the
/// transaction rolls back). Returns its position.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_append(topic: Option<&str>, payload: Option<&str>) -> i64 {
    let topic = topic.map(|t| checked("topic", Some(t), NAME_BYTES_MAX));
    let payload = checked_payload(payload);
    with_client(|c| Ok(c.append(topic, payload.as_bytes())?)).0 as i64
}

/// Appends a message to the total order when the current transaction commits, and never if
/// it rolls back (a transactional outbox). Its `seq` is given when the background worker
/// settles the transaction, right after the commit; one transaction's messages are contiguous.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_append_on_commit(topic: Option<&str>, payload: Option<&str>) {
    let topic = topic.map(|t| checked("topic", Some(t), NAME_BYTES_MAX));
    let payload = checked_payload(payload);
    xact::append_on_commit(topic, payload.as_bytes());
}

/// Messages from `from_seq` on, in the total order (optionally of one topic).
#[pg_extern(volatile, parallel_unsafe)]
fn tob_read(
    from_seq: Option<i64>,
    max: default!(Option<i32>, 100),
    topic: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(seq, i64), name!(topic, Option<String>), name!(payload, String))>
{
    let (Some(from_seq), Some(max)) = (from_seq, max) else {
        TobError::BadArgument("from_seq and max must not be NULL".into()).raise()
    };
    if from_seq < 1 || max < 0 {
        TobError::BadArgument("from_seq must be at least 1 and max not negative".into()).raise()
    }
    let topic = topic.map(|t| checked("topic", Some(t), NAME_BYTES_MAX).to_owned());
    // Page by page, as the rows are taken (a LIMIT stops it): a node answers at most 10,000
    // messages or about 4 MiB of payloads per call, so one call is not the whole read, and the
    // whole read need not fit in the backend's memory.
    let mut reading = tob_client::Reading::new(Seq(from_seq as u64), max as u32);
    let mut page = Vec::new().into_iter();
    let rows = std::iter::from_fn(move || {
        loop {
            if let Some(m) = page.next() {
                return Some(m);
            }
            if reading.done {
                return None;
            }
            let (records, complete) = with_client(|c| {
                Ok(c.read_messages_page(reading.from, reading.max, topic.as_deref())?)
            });
            reading.advance(&records, complete);
            page = records.into_iter();
        }
    });
    TableIterator::new(
        rows.map(|m| (m.seq.0 as i64, m.topic, String::from_utf8_lossy(&m.payload).into_owned())),
    )
}

/// A linearizable position: every command acknowledged before this call is applied at it.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_sync() -> i64 {
    with_client(|c| Ok(c.sync()?)) as i64
}

/// Declares a namespace for the whole cluster, so that claims in it are accepted; false if it
/// existed already. Not transactional: it stays when the transaction rolls back.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_create_namespace(name: Option<&str>) -> bool {
    let name = checked("namespace", name, NAME_BYTES_MAX);
    with_client(|c| Ok(c.create_namespace(name)?))
}

/// The namespaces declared on the cluster, in order (after a ReadIndex: linearizable).
#[pg_extern(volatile, parallel_unsafe)]
fn tob_namespaces() -> SetOfIterator<'static, String> {
    SetOfIterator::new(with_client(|c| Ok(c.namespaces()?)))
}

/// Gap-free, linearizable increment-and-get of a global counter (not transactional).
#[pg_extern(volatile, parallel_unsafe)]
fn tob_next(counter: Option<&str>) -> i64 {
    let counter = checked("counter", counter, NAME_BYTES_MAX);
    with_client(|c| Ok(c.next(counter)?)) as i64
}

/// Takes a session-held lock on `resource`; returns its fencing token. Held until
/// `tob_unlock`, the end of this connection, or the instance losing its session.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_lock(resource: Option<&str>) -> i64 {
    let resource = checked("resource", resource, KEY_BYTES_MAX);
    locks::lock(resource).0 as i64
}

/// Releases this connection's lock on `resource`; false if it held none.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_unlock(resource: Option<&str>) -> bool {
    let resource = checked("resource", resource, KEY_BYTES_MAX);
    locks::unlock(resource)
}

/// Each node's view of the cluster; unreachable nodes are listed with `reachable = false`.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
fn tob_status() -> TableIterator<
    'static,
    (
        name!(node, String),
        name!(reachable, bool),
        name!(role, Option<String>),
        name!(term, Option<i64>),
        name!(leader, Option<i64>),
        name!(commit_index, Option<i64>),
        name!(applied_index, Option<i64>),
        name!(last_seq, Option<i64>),
    ),
> {
    let nodes: Vec<String> = guc::cluster()
        .map(|c| c.split(',').map(|n| n.trim().to_owned()).collect())
        .unwrap_or_default();
    let rows = with_client(|c| {
        Ok((0..nodes.len())
            .map(|i| match c.status_of(i) {
                Ok(s) => (
                    nodes[i].clone(),
                    true,
                    Some(s.role),
                    Some(s.term as i64),
                    s.leader.map(|l| l as i64),
                    Some(s.commit_index as i64),
                    Some(s.applied_index as i64),
                    Some(s.last_seq as i64),
                ),
                Err(_) => (nodes[i].clone(), false, None, None, None, None, None, None),
            })
            .collect::<Vec<_>>())
    });
    TableIterator::new(rows)
}

/// Trigger function: `tob_unique('namespace', 'column')` keeps a column's values unique across
/// every database using the same cluster. As an `AFTER ... FOR EACH ROW` trigger, INSERT claims
/// NEW's value, UPDATE moves the claim, DELETE releases it — each final exactly when the
/// transaction commits; as a `BEFORE TRUNCATE ... FOR EACH STATEMENT` trigger, TRUNCATE
/// releases every value in the table. NULLs are not claimed (as in a unique index). The key
/// is the value's text form (its type's output function), so any column type works.
///
/// Only AFTER row triggers see what was written. A BEFORE one sees a row that may still not be
/// written, or not as seen: `INSERT ... ON CONFLICT` fires it for the proposed row and then
/// skips that row or updates another (the name stayed claimed with no row), and a later BEFORE
/// trigger may skip the row or change the column (a skipped DELETE released a name whose row
/// stays, so another database could take it too). So BEFORE row triggers are refused.
#[pg_trigger]
fn tob_unique<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, impl WhoAllocated>>, pgrx::PgTriggerError> {
    use pgrx::{PgTriggerLevel, PgTriggerOperation, PgTriggerWhen};
    let args = trigger.extra_args()?;
    let [namespace, column] = args.as_slice() else {
        TobError::TriggerMisuse(format!(
            "needs two arguments, the namespace and the column, not {}",
            args.len()
        ))
        .raise()
    };
    let namespace = checked("namespace", Some(namespace), NAME_BYTES_MAX);
    let data = trigger.trigger_data();
    // Only errors and TRUNCATE need it: not looked up for every row.
    let table = || trigger.table_name().unwrap_or_else(|_| "?".into());
    let (when, level, op) = (trigger.when()?, trigger.level(), trigger.op()?);
    let column = UniqueColumn::find(data, table, column);
    let owner = backend::default_owner();
    match (&when, &level, &op) {
        (PgTriggerWhen::Before, PgTriggerLevel::Statement, PgTriggerOperation::Truncate) => {
            let schema = trigger.table_schema()?;
            // A partitioned table keeps its rows in its partitions, whose own TRUNCATE
            // triggers (statement triggers are not cloned to partitions) do not fire.
            let partitioned = unsafe { (*(*data.tg_relation).rd_rel).relkind }
                == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char;
            for value in column.values_in_table(&schema, &table(), partitioned) {
                xact::hold_row_op(namespace, &value, &owner, None);
            }
            return Ok(None);
        }
        // Fired at the end of the statement, for the rows it wrote, as they were written; the
        // claim is still made inside the statement. Not INSTEAD OF (a view: PostgreSQL itself
        // writes nothing of the row).
        (
            PgTriggerWhen::After,
            PgTriggerLevel::Row,
            PgTriggerOperation::Insert | PgTriggerOperation::Update | PgTriggerOperation::Delete,
        ) => {}
        (PgTriggerWhen::Before, PgTriggerLevel::Row, _) => TobError::TriggerMisuse(format!(
            "trigger \"{}\" on \"{}\" is BEFORE {op} FOR EACH ROW; declare it AFTER: a BEFORE row trigger also sees rows that are then not written as it saw them (INSERT ... ON CONFLICT, or another BEFORE trigger skipping or changing the row), and would claim or release names for them",
            trigger.name()?,
            table()
        ))
        .raise(),
        _ => TobError::TriggerMisuse(format!(
            "must be fired AFTER INSERT, UPDATE or DELETE FOR EACH ROW, or BEFORE TRUNCATE FOR EACH STATEMENT; trigger \"{}\" on \"{}\" is {when} {op} FOR EACH {level}",
            trigger.name()?,
            table()
        ))
        .raise(),
    }
    // INSERT: tg_trigtuple is NEW; UPDATE: tg_trigtuple is OLD, tg_newtuple NEW; DELETE: OLD.
    let (new_tuple, old_tuple) = match &op {
        PgTriggerOperation::Insert => (data.tg_trigtuple, std::ptr::null_mut()),
        PgTriggerOperation::Update => (data.tg_newtuple, data.tg_trigtuple),
        _ => (std::ptr::null_mut(), data.tg_trigtuple),
    };
    let new_value = column.value(new_tuple);
    let old_value = column.value(old_tuple);
    if new_value != old_value {
        if let Some(value) = &new_value {
            let key = checked("key", Some(value), KEY_BYTES_MAX);
            xact::hold_row_op(namespace, key, &owner, Some(row_id(data, new_tuple)));
        }
        if let Some(value) = &old_value {
            xact::hold_row_op(namespace, value, &owner, None);
        }
    }
    Ok(trigger.new().or(trigger.old()))
}

/// Claims the values of the rows already in `table` when its `tob_unique` trigger was
/// created, as the trigger claims a row written since: for this database, under the same key
/// (the value's output form, under the trigger's fixed settings), pending until this
/// transaction commits. A key this database already holds (a row written since the trigger,
/// or an earlier run) counts as claimed, so running it again is harmless; a key another
/// database holds fails with 23505, as does a value two rows share, and then nothing is
/// claimed. Writers to the table wait until this transaction ends (`LOCK ... IN SHARE MODE`),
/// so that no row slips between the read and the claims. Returns how many rows' values are
/// claimed, one per row and trigger.
#[pg_extern(volatile, parallel_unsafe)]
fn tob_unique_claim_rows(table: Option<&str>) -> i64 {
    let table = checked("table", table, KEY_BYTES_MAX);
    let owner = backend::default_owner();
    let found = Spi::connect_mut(|client| {
        let relation = format!("{}::regclass", pgrx::spi::quote_literal(table));
        let sql = format!(
            "SELECT c.oid::bigint, c.relkind = 'p', n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = {relation}"
        );
        let row = client.select(&sql, Some(1), &[])?.first();
        let (oid, partitioned, schema, name) = (
            row.get::<i64>(1)?.unwrap_or(0),
            row.get::<bool>(2)?.unwrap_or(false),
            row.get::<String>(3)?.unwrap_or_default(),
            row.get::<String>(4)?.unwrap_or_default(),
        );
        let qualified = pgrx::spi::quote_qualified_identifier(&schema, &name);
        client.update(&format!("LOCK TABLE {qualified} IN SHARE MODE"), None, &[])?;
        // Its enabled row triggers; TRUNCATE's statement trigger has the same arguments.
        let sql = format!(
            "SELECT t.tgargs FROM pg_trigger t
               JOIN pg_proc p ON p.oid = t.tgfoid AND p.proname = 'tob_unique'
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                               AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'tob'
              WHERE t.tgrelid = {oid} AND t.tgenabled <> 'D' AND t.tgnargs = 2
                AND (t.tgtype & 1) = 1
              ORDER BY t.tgname"
        );
        let mut pairs: Vec<(String, String)> = Vec::new();
        for row in client.select(&sql, None, &[])? {
            let args = row.get::<Vec<u8>>(1)?.unwrap_or_default();
            let args: Vec<String> =
                args.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            if let [namespace, column, ..] = args.as_slice() {
                let pair = (namespace.clone(), column.clone());
                if !pairs.contains(&pair) {
                    pairs.push(pair);
                }
            }
        }
        Ok::<_, pgrx::spi::Error>((oid, partitioned, qualified, pairs))
    });
    let (oid, partitioned, qualified, pairs) =
        found.unwrap_or_else(|e| TobError::BadArgument(format!("table {table:?}: {e}")).raise());
    if pairs.is_empty() {
        TobError::NotConfigured(format!(
            "table {table:?} has no enabled tob_unique row trigger: create it first, then claim the rows it does not cover"
        ))
        .raise()
    }
    let mut claimed = 0i64;
    for (namespace, column) in &pairs {
        let namespace = checked("namespace", Some(namespace), NAME_BYTES_MAX);
        claimed += claim_rows(oid, partitioned, &qualified, namespace, column, &owner);
    }
    xact::send_row_ops();
    claimed
}

/// Claims `column`'s value of each row of `qualified` (with its partitions' rows if
/// `partitioned`) in `namespace`; see [`tob_unique_claim_rows`].
fn claim_rows(
    oid: i64,
    partitioned: bool,
    qualified: &str,
    namespace: &str,
    column: &str,
    owner: &str,
) -> i64 {
    let query = format!(
        "SELECT c.tableoid::bigint, c.ctid::text, {key}
           FROM {only} {qualified} c WHERE c.{column} IS NOT NULL",
        key = key_text_sql(&format!("c.{}", pgrx::spi::quote_identifier(column))),
        column = pgrx::spi::quote_identifier(column),
        only = if partitioned { "" } else { "ONLY" },
    );
    // A key this database holds already is taken as claimed and not recorded as a row's, so
    // the transaction's own check would not see a second row with it: checked here.
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut claimed = 0i64;
    let read = with_fixed_output_settings(|| {
        Spi::connect(|client| {
            let mut cursor = client.open_cursor(&query, &[]);
            loop {
                let mut batch: Vec<(i64, String, String)> = Vec::new();
                for row in cursor.fetch(1000)? {
                    batch.push((
                        row.get::<i64>(1)?.unwrap_or(oid),
                        row.get::<String>(2)?.unwrap_or_default(),
                        row.get::<String>(3)?.unwrap_or_default(),
                    ));
                }
                // SPI keeps every fetched batch until the end of the call otherwise.
                unsafe {
                    pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
                    pg_sys::SPI_tuptable = std::ptr::null_mut();
                }
                if batch.is_empty() {
                    return Ok::<_, pgrx::spi::Error>(());
                }
                for (relation, ctid, value) in batch {
                    let key = checked("key", Some(&value), KEY_BYTES_MAX);
                    if !seen.insert(key.to_owned()) {
                        TobError::TakenInTransaction {
                            namespace: namespace.into(),
                            key: key.into(),
                        }
                        .raise()
                    }
                    xact::hold_existing_row(namespace, key, owner, parse_row_id(relation, &ctid));
                    claimed += 1;
                }
            }
        })
    });
    read.unwrap_or_else(|e| TobError::BadArgument(format!("reading {qualified}: {e}")).raise());
    claimed
}

/// The SQL expression for the key of `value` (a column reference) as the row trigger takes
/// it: the type's output function, through `format('%s', …)`, under
/// [`with_fixed_output_settings`]. Not a cast to text, which for `char(n)`, `bool` and `inet`
/// gives another text (see [`UniqueColumn::values_in_table`]).
fn key_text_sql(value: &str) -> String {
    format!("format('%s', {value})")
}

/// A row's id from its table's oid and its `ctid` text, `(block,offset)`.
fn parse_row_id(relation: i64, ctid: &str) -> xact::RowId {
    let (block, offset) = ctid
        .trim_matches(|c| c == '(' || c == ')')
        .split_once(',')
        .and_then(|(b, o)| Some((b.parse().ok()?, o.parse().ok()?)))
        .unwrap_or((0, 0));
    xact::RowId { relation: relation as u32, block, offset }
}

/// The row version a trigger fires for: its table and `ctid`.
fn row_id(data: &pg_sys::TriggerData, tuple: pg_sys::HeapTuple) -> xact::RowId {
    // SAFETY: a row trigger's relation and tuple are valid for the call.
    let (relation, place) = unsafe { ((*data.tg_relation).rd_id, (*tuple).t_self) };
    xact::RowId {
        relation: relation.to_u32(),
        block: (u32::from(place.ip_blkid.bi_hi) << 16) | u32::from(place.ip_blkid.bi_lo),
        offset: place.ip_posid,
    }
}

/// The column a `tob_unique` trigger keeps unique, checked against the table.
struct UniqueColumn {
    tupdesc: pg_sys::TupleDesc,
    attnum: i32,
    name: String,
    /// Whether the type's text form may depend on session settings (see
    /// [`with_fixed_output_settings`]); false for the common types whose form never does.
    settings_dependent: bool,
}

/// Types whose output function ignores every setting: their text form is the same in every
/// session, so their keys need no fixed settings (which cost a few microseconds per row).
const SETTINGS_FREE_TYPES: [pg_sys::Oid; 12] = [
    pg_sys::TEXTOID,
    pg_sys::VARCHAROID,
    pg_sys::BPCHAROID,
    pg_sys::NAMEOID,
    pg_sys::CHAROID,
    pg_sys::INT2OID,
    pg_sys::INT4OID,
    pg_sys::INT8OID,
    pg_sys::NUMERICOID,
    pg_sys::UUIDOID,
    pg_sys::BOOLOID,
    pg_sys::OIDOID,
];

/// Runs `f` with the settings that shape output functions' text fixed, and restores the
/// session's afterwards (also on error: PostgreSQL unwinds the nesting level at the abort).
///
/// A key is a value's text form, and for many types that form depends on the session: the
/// same `timestamptz` reads `2026-01-01 00:00:00+00` under `TimeZone = UTC` and `2026-01-01
/// 09:00:00+09` in Tokyo; `DateStyle`, `IntervalStyle`, `extra_float_digits`, `bytea_output`
/// and `lc_monetary` do the like for dates, intervals, floats, bytea and money, and
/// `search_path` for `regclass` and friends. Taken from the session, one value had two keys:
/// two databases (or two sessions of one) could both insert it, and a DELETE under other
/// settings released nothing, leaving the name claimed for good. (postgres_fdw fixes
/// `DateStyle`, `IntervalStyle`, `extra_float_digits` and `search_path` for the same reason,
/// to send values to another server.)
fn with_fixed_output_settings<T>(f: impl FnOnce() -> T) -> T {
    const FIXED: [(&std::ffi::CStr, &std::ffi::CStr); 7] = [
        (c"DateStyle", c"ISO, YMD"),
        (c"IntervalStyle", c"postgres"),
        (c"TimeZone", c"UTC"),
        (c"extra_float_digits", c"1"),
        (c"bytea_output", c"hex"),
        (c"lc_monetary", c"C"),
        (c"search_path", c"pg_catalog"),
    ];
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    for (name, value) in FIXED {
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            )
        };
    }
    let result = f();
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    result
}

impl UniqueColumn {
    /// Raises 42703 if the table has no such column.
    fn find(data: &pg_sys::TriggerData, table: impl Fn() -> String, name: &str) -> UniqueColumn {
        let tupdesc = unsafe { (*data.tg_relation).rd_att };
        let cname = std::ffi::CString::new(name).unwrap_or_default();
        let attnum = unsafe { pg_sys::SPI_fnumber(tupdesc, cname.as_ptr()) };
        if attnum <= 0 {
            let table = table();
            TobError::UndefinedColumn(format!("column \"{name}\" of \"{table}\" does not exist"))
                .raise()
        }
        let attribute = unsafe { &*(*tupdesc).attrs.as_ptr().add(attnum as usize - 1) };
        let base_type = unsafe { pg_sys::getBaseType(attribute.atttypid) };
        let settings_dependent = !SETTINGS_FREE_TYPES.contains(&base_type);
        UniqueColumn { tupdesc, attnum, name: name.to_owned(), settings_dependent }
    }

    /// The value's text form in `tuple`; None for NULL or no tuple.
    fn value(&self, tuple: pg_sys::HeapTuple) -> Option<String> {
        if tuple.is_null() {
            return None;
        }
        let output = || unsafe { pg_sys::SPI_getvalue(tuple, self.tupdesc, self.attnum) };
        let text =
            if self.settings_dependent { with_fixed_output_settings(output) } else { output() };
        if text.is_null() {
            return None;
        }
        let value = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy().into_owned();
        unsafe { pg_sys::pfree(text.cast()) };
        Some(value)
    }

    /// Every non-NULL value of the column in the table itself, in its text form: with its
    /// partitions' rows for a partitioned table, without inheritance children otherwise (a
    /// TRUNCATE fires their own triggers).
    ///
    /// `format('%s', v)` calls the type's output function, as [`Self::value`] does. A cast to
    /// text does not always: `char(n)` drops its padding, `bool` gives `true` for `t`, `inet`
    /// adds the netmask (`10.0.0.1/32`); with the cast, a TRUNCATE released keys other than
    /// those claimed, and the names stayed claimed for good (fixed 2026-12-07).
    fn values_in_table(&self, schema: &str, table: &str, partitioned: bool) -> Vec<String> {
        let query = format!(
            "SELECT {key} FROM {only} {table} WHERE {column} IS NOT NULL",
            key = key_text_sql(&pgrx::spi::quote_identifier(&self.name)),
            only = if partitioned { "" } else { "ONLY" },
            column = pgrx::spi::quote_identifier(&self.name),
            table = pgrx::spi::quote_qualified_identifier(schema, table),
        );
        // Under the same settings as `value`.
        with_fixed_output_settings(|| {
            Spi::connect(|client| {
                let rows = client.select(&query, None, &[])?;
                let mut values = Vec::with_capacity(rows.len());
                for row in rows {
                    values.extend(row.get::<String>(1)?);
                }
                Ok::<_, pgrx::spi::Error>(values)
            })
        })
        .unwrap_or_else(|e| {
            TobError::TriggerMisuse(format!("cannot read the table before TRUNCATE: {e}")).raise()
        })
    }
}

extension_sql!(
    r#"
-- The storage side of fencing: the highest token seen per resource in this database.
CREATE TABLE tob_fences (
    resource text PRIMARY KEY,
    token bigint NOT NULL
);

-- Accepts `token` for `resource` if it is at least the highest seen; raises TB001 otherwise.
-- Call it in the same transaction as the write it guards.
CREATE FUNCTION tob_fence(resource text, token bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    highest bigint;
BEGIN
    IF $1 IS NULL OR $2 IS NULL THEN
        RAISE EXCEPTION 'tob: resource and token must not be NULL' USING ERRCODE = '22023';
    END IF;
    INSERT INTO tob_fences AS f VALUES ($1, $2)
    ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token WHERE f.token <= EXCLUDED.token
    RETURNING f.token INTO highest;
    IF highest IS NULL THEN
        SELECT f.token INTO highest FROM tob_fences f WHERE f.resource = $1;
        RAISE EXCEPTION 'tob: fencing token % for "%" is stale', $2, $1
            USING ERRCODE = 'TB001',
                  DETAIL = format('Token %s has already been used for this resource.', highest),
                  HINT = 'The lock this token came from was lost; take it again.';
    END IF;
    RETURN highest;
END
$$;
"#,
    name = "fences",
);

extension_sql!(
    r#"
-- Nothing for PUBLIC: grant tob_user to the roles that may claim, append and read.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tob_user') THEN
        CREATE ROLE tob_user NOLOGIN;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION tob_claim(text, text, text), tob_release(text, text, text),
    tob_owner(text, text), tob_append(text, text), tob_append_on_commit(text, text),
    tob_read(bigint, integer, text),
    tob_sync(), tob_next(text), tob_lock(text), tob_unlock(text), tob_status(),
    tob_fence(text, bigint), tob_unique(), tob_unique_claim_rows(text), tob_namespaces()
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tob_claim(text, text, text), tob_release(text, text, text),
    tob_owner(text, text), tob_append(text, text), tob_append_on_commit(text, text),
    tob_read(bigint, integer, text),
    tob_sync(), tob_next(text), tob_lock(text), tob_unlock(text), tob_status(),
    tob_fence(text, bigint), tob_unique(), tob_unique_claim_rows(text), tob_namespaces()
    TO tob_user;
GRANT SELECT, INSERT, UPDATE ON tob_fences TO tob_user;
-- Declaring a namespace is part of defining a schema, not of using it: not for tob_user.
REVOKE ALL ON FUNCTION tob_create_namespace(text) FROM PUBLIC;
"#,
    name = "privileges",
    finalize,
);
