//! The tob client library, blocking flavour (for the PostgreSQL extension and tools).
//!
//! It finds the leader from any node, follows redirects, and retries a request at other nodes
//! with the **same** `(client_id, request_id)` until its deadline, so a retry is answered from
//! the cluster's de-duplication table and never applied twice. Every socket call has a timeout;
//! between waits it calls an optional interrupt hook, so a caller (a PostgreSQL backend) can
//! abandon the wait on cancel.

#[cfg(feature = "async")]
mod asynchronous;
mod shape;
#[cfg(feature = "async")]
pub use asynchronous::AsyncClient;
pub use shape::Reading;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use tob_proto::frame::{self, FrameKind, HEADER_BYTES};
use tob_proto::{
    Call, ClaimKey, ClaimKind, ClientId, ClientRequest, ClientResponse, Command, ErrorCode,
    MessageRecord, NodeStatus, Outcome, OwnerInfo, ReadConsistency, Reply, Request, RequestId, Seq,
    SessionId,
};

/// Errors a client call can end with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// No node could be reached within the connect timeout.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// No answer before the deadline: the request may or may not have taken effect.
    #[error("request timed out; it may or may not have taken effect")]
    Timeout,
    /// The interrupt hook asked to stop waiting.
    #[error("interrupted")]
    Interrupted,
    /// The cluster refused the request.
    #[error("{code}: {message}")]
    Refused { code: ErrorCode, message: String },
    /// The node sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Unavailable(_) => ErrorCode::Unavailable,
            ClientError::Timeout | ClientError::Interrupted => ErrorCode::Timeout,
            ClientError::Refused { code, .. } => *code,
            ClientError::Protocol(_) => ErrorCode::Malformed,
        }
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client addresses of the cluster's nodes (any subset works; the leader is discovered).
    pub nodes: Vec<String>,
    pub cluster_id: u64,
    pub connect_timeout: Duration,
    /// Deadline of one call, retries included.
    pub request_timeout: Duration,
    /// How often a blocked wait wakes to call the interrupt hook.
    pub poll_interval: Duration,
    pub max_frame_bytes: usize,
}

impl ClientConfig {
    pub fn new(nodes: Vec<String>, cluster_id: u64) -> ClientConfig {
        ClientConfig {
            nodes,
            cluster_id,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(50),
            max_frame_bytes: 8 * 1024 * 1024,
        }
    }
}

struct Connection {
    node: usize,
    stream: TcpStream,
    /// Bytes read from the stream and not yet consumed: one `read` usually brings a whole
    /// response, header and payload, so a call costs one receive instead of two.
    received: Vec<u8>,
    /// Where `read` puts bytes before they join `received`: allocated and zeroed once per
    /// connection (zeroing a 16 KiB buffer on the stack for every read showed in profiles).
    chunk: Box<[u8]>,
    /// The read timeout last set on the stream, so it is set again only when it changes.
    read_timeout: Option<Duration>,
}

/// A blocking client. One request at a time per client; use several for concurrency.
pub struct Client {
    config: ClientConfig,
    client_id: ClientId,
    next_request: u64,
    next_call: u64,
    connection: Option<Connection>,
    /// Index into `config.nodes` of the node believed to lead.
    target: usize,
    interrupt: Option<Box<dyn FnMut() -> bool + Send>>,
}

impl Client {
    pub fn new(config: ClientConfig) -> Client {
        assert!(!config.nodes.is_empty(), "a client needs at least one node address");
        Client {
            config,
            client_id: ClientId(uuid::Uuid::new_v4().as_u128()),
            next_request: 1,
            next_call: 1,
            connection: None,
            target: 0,
            interrupt: None,
        }
    }

    /// Installs a hook called between waits; returning `true` abandons the call with
    /// [`ClientError::Interrupted`].
    pub fn set_interrupt(&mut self, hook: impl FnMut() -> bool + Send + 'static) {
        self.interrupt = Some(Box::new(hook));
    }

    /// Timeouts and limits may change between calls (a PostgreSQL session's settings do).
    pub fn config_mut(&mut self) -> &mut ClientConfig {
        &mut self.config
    }

    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// Runs a state-machine command through the log, exactly once.
    pub fn command(&mut self, command: Command) -> Result<Outcome, ClientError> {
        let request_id = RequestId(self.next_request);
        self.next_request += 1;
        let request = Request {
            client: Some(self.client_id),
            request_id,
            first_incomplete: request_id,
            command,
        };
        shape::outcome(self.call(Call::Command(request))?)
    }

    /// Runs state-machine commands through the log with all of them in flight at once on one
    /// connection, each exactly once: their outcomes, in order (an `Outcome::Error` among
    /// them, such as `unknown_session`, is an outcome here, not an error). The node applies
    /// them in the order sent, as if they had been sent one after another, at about the cost
    /// of one round trip for the lot. Any other failure fails the whole call — a node that is
    /// not the leader (the next call goes to the one it named), a refusal, a lost connection,
    /// a timeout, an interrupt — and some of the commands may then have been applied: pipeline
    /// only commands that are safe to repeat (a holder's claim granted again returns its
    /// token).
    pub fn pipeline(&mut self, commands: Vec<Command>) -> Result<Vec<Outcome>, ClientError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + self.config.request_timeout;
        let first_request = RequestId(self.next_request);
        let first_call = self.next_call;
        let mut bytes = Vec::new();
        for command in commands {
            let request_id = RequestId(self.next_request);
            self.next_request += 1;
            let request = Request {
                client: Some(self.client_id),
                request_id,
                first_incomplete: first_request,
                command,
            };
            let call = ClientRequest { id: self.next_call, call: Call::Command(request) };
            self.next_call += 1;
            let payload = postcard::to_allocvec(&call).expect("serialising to a Vec cannot fail");
            bytes.extend(frame::encode(FrameKind::Request, self.config.cluster_id, &payload));
        }
        let count = (self.next_call - first_call) as usize;
        let node = self.target;
        let result = self.pipeline_at(node, &bytes, first_call, count, deadline);
        match result {
            Ok(outcomes) => Ok(outcomes),
            Err(e) => {
                // Answers still on their way would be skipped by id, but a fresh connection
                // is simpler to reason about after a pipeline cut short.
                self.connection = None;
                let moved_on = matches!(
                    e,
                    ClientError::Refused { code: ErrorCode::NotLeader, .. }
                        | ClientError::Interrupted
                );
                if !moved_on {
                    self.target = (node + 1) % self.config.nodes.len();
                }
                Err(e)
            }
        }
    }

    fn pipeline_at(
        &mut self,
        node: usize,
        bytes: &[u8],
        first_call: u64,
        count: usize,
        deadline: Instant,
    ) -> Result<Vec<Outcome>, ClientError> {
        self.ensure_connection(node)?;
        let stream = &mut self.connection.as_mut().expect("connected").stream;
        if let Err(e) = stream.write_all(bytes) {
            return Err(ClientError::Unavailable(format!("{}: {e}", self.config.nodes[node])));
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; count];
        let mut answered = 0;
        while answered < count {
            let response = self.read_frame(deadline)?;
            let response: ClientResponse = postcard::from_bytes(&response)
                .map_err(|e| ClientError::Protocol(format!("undecodable response: {e}")))?;
            let at = response.id.checked_sub(first_call).and_then(|at| usize::try_from(at).ok());
            let Some(slot) = at.and_then(|at| outcomes.get_mut(at)) else {
                continue; // an answer to an earlier, abandoned call on this connection
            };
            let outcome = match response.reply {
                Reply::Outcome(outcome) => outcome,
                Reply::Error { code, message, leader } => {
                    if code == ErrorCode::NotLeader {
                        self.target = leader
                            .and_then(|l| self.config.nodes.iter().position(|n| *n == l))
                            .unwrap_or((node + 1) % self.config.nodes.len());
                    }
                    return Err(ClientError::Refused { code, message });
                }
                other => return Err(shape::unexpected(other)),
            };
            if slot.is_none() {
                answered += 1;
            }
            *slot = Some(outcome);
        }
        Ok(outcomes.into_iter().map(|o| o.expect("all answered")).collect())
    }

    pub fn append(&mut self, topic: Option<&str>, payload: &[u8]) -> Result<Seq, ClientError> {
        shape::appended(self.command(shape::append(topic, payload))?)
    }

    /// A plain (held, never expiring) claim. `Ok(Outcome::Claimed{..})` or `Ok(Outcome::Taken{..})`.
    pub fn claim(
        &mut self,
        namespace: &str,
        key: &str,
        owner: &str,
    ) -> Result<Outcome, ClientError> {
        self.command(shape::claim(namespace, key, owner))
    }

    /// A claim of any kind: `Transactional` and `Ephemeral` claims need a session; `holder`
    /// names who may prepare, finalize or release it (a transaction id, or the owner).
    pub fn claim_with(
        &mut self,
        namespace: &str,
        key: &str,
        owner: &str,
        holder: &str,
        kind: ClaimKind,
        session: Option<SessionId>,
    ) -> Result<Outcome, ClientError> {
        self.command(Command::Claim {
            key: claim_key(namespace, key),
            owner: owner.into(),
            holder: holder.into(),
            kind,
            session,
        })
    }

    /// Opens a session that lives while kept alive within `ttl`.
    pub fn open_session(&mut self, ttl: Duration) -> Result<SessionId, ClientError> {
        match self.command(Command::OpenSession { ttl_ms: ttl.as_millis() as u64 })? {
            Outcome::SessionOpened { session } => Ok(session),
            other => Err(shape::unexpected_outcome(other)),
        }
    }

    /// Renews a session; `Refused{unknown_session}` once it has expired.
    pub fn keep_alive(&mut self, session: SessionId) -> Result<(), ClientError> {
        match self.command(Command::KeepAlive { session })? {
            Outcome::KeptAlive => Ok(()),
            other => Err(shape::unexpected_outcome(other)),
        }
    }

    /// Prepares all listed pending claims of `holder`: `Ok(Outcome::Prepared)` or
    /// `Ok(Outcome::Lost{keys})`.
    pub fn prepare(&mut self, holder: &str, keys: Vec<ClaimKey>) -> Result<Outcome, ClientError> {
        self.command(Command::Prepare { holder: holder.into(), keys })
    }

    pub fn finalize(&mut self, holder: &str, keys: Vec<ClaimKey>) -> Result<Outcome, ClientError> {
        self.command(Command::Finalize { holder: holder.into(), keys })
    }

    pub fn release(
        &mut self,
        namespace: &str,
        key: &str,
        owner: &str,
    ) -> Result<Outcome, ClientError> {
        self.command(shape::release(namespace, key, owner))
    }

    /// Schedules the release of `owner`'s claim for when `holder`'s transaction commits.
    pub fn release_on_commit(
        &mut self,
        key: ClaimKey,
        owner: &str,
        holder: &str,
    ) -> Result<Outcome, ClientError> {
        self.command(Command::ReleaseOnCommit { key, owner: owner.into(), holder: holder.into() })
    }

    /// Stages messages under `holder` (a transaction) until a `Settle` names it: appended in
    /// this order if it committed, dropped if not. `Ok(Outcome::Staged{..})` or an error.
    pub fn stage(
        &mut self,
        holder: &str,
        messages: Vec<tob_proto::StagedMessage>,
    ) -> Result<Outcome, ClientError> {
        self.command(Command::Stage { holder: holder.into(), messages })
    }

    /// Withdraws a [`Client::release_on_commit`] of `holder`.
    pub fn keep_on_commit(&mut self, key: ClaimKey, holder: &str) -> Result<Outcome, ClientError> {
        self.command(Command::KeepOnCommit { key, holder: holder.into() })
    }

    /// Settles every in-flight claim of the given holders by their transactions' fate.
    pub fn settle(
        &mut self,
        committed: Vec<String>,
        aborted: Vec<String>,
    ) -> Result<u64, ClientError> {
        match self.command(Command::Settle { committed, aborted })? {
            Outcome::Settled { claims } => Ok(claims),
            other => Err(shape::unexpected_outcome(other)),
        }
    }

    /// Every holder starting with `prefix` that has claims or staged messages in flight (at
    /// most about `limit`), from one state of the cluster whenever they fit in one page of
    /// [`tob_proto::HOLDERS_LISTED_MAX`] — see [`collect_pages`].
    pub fn all_in_flight_holders(
        &mut self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>, ClientError> {
        let page = tob_proto::HOLDERS_LISTED_MAX;
        collect_pages(page, limit, |after| self.in_flight_holders(prefix, after, page as u32))
    }

    /// Holders starting with `prefix` that have claims in flight (linearizable read).
    pub fn in_flight_holders(
        &mut self,
        prefix: &str,
        after: Option<String>,
        max: u32,
    ) -> Result<Vec<String>, ClientError> {
        match self.call(Call::InFlightHolders { prefix: prefix.into(), after, max })? {
            Reply::Holders(holders) => Ok(holders),
            other => Err(shape::unexpected(other)),
        }
    }

    /// Declares a namespace so that claims in it are accepted; false if it existed already.
    pub fn create_namespace(&mut self, name: &str) -> Result<bool, ClientError> {
        shape::namespace_created(self.command(Command::CreateNamespace { name: name.into() })?)
    }

    pub fn next(&mut self, counter: &str) -> Result<u64, ClientError> {
        shape::counter(self.command(Command::Next { counter: counter.into() })?)
    }

    pub fn owner(
        &mut self,
        namespace: &str,
        key: &str,
        consistency: ReadConsistency,
    ) -> Result<Option<OwnerInfo>, ClientError> {
        let key = claim_key(namespace, key);
        if consistency == ReadConsistency::Log {
            return shape::owner_in_log(self.command(Command::Read { key })?);
        }
        shape::owner(self.call(Call::Owner { key, consistency })?)
    }

    /// A linearizable position, applied at the node that answered.
    pub fn sync(&mut self) -> Result<u64, ClientError> {
        shape::synced(self.call(Call::Sync)?)
    }

    /// The declared namespaces, in order (linearizable: after a ReadIndex).
    pub fn namespaces(&mut self) -> Result<Vec<String>, ClientError> {
        shape::namespaces(self.call(Call::Namespaces)?)
    }

    /// Up to `max` messages from `from` on (optionally of one topic): all of them, read page
    /// by page (each page after its own ReadIndex) — fewer than `max` only when there were no
    /// more when the last page was read.
    pub fn read_messages(
        &mut self,
        from: Seq,
        max: u32,
        topic: Option<&str>,
    ) -> Result<Vec<MessageRecord>, ClientError> {
        let mut messages = Vec::new();
        let mut reading = shape::Reading::new(from, max);
        while !reading.done {
            let (page, complete) = self.read_messages_page(reading.from, reading.max, topic)?;
            reading.advance(&page, complete);
            messages.extend(page);
        }
        Ok(messages)
    }

    /// One page of [`Client::read_messages`]: at most `max` messages (and at most 10,000, and
    /// about half a frame of payloads, but at least one if any), and whether no further
    /// message of the read existed.
    pub fn read_messages_page(
        &mut self,
        from: Seq,
        max: u32,
        topic: Option<&str>,
    ) -> Result<(Vec<MessageRecord>, bool), ClientError> {
        shape::messages_page(self.call(Call::ReadMessagesPage {
            from,
            max,
            topic: topic.map(str::to_owned),
        })?)
    }

    /// Streams messages from `from` on (optionally of one topic) to `each` until it returns
    /// `false` or the interrupt hook fires. Survives node failures and leader changes: on a
    /// broken connection it resumes at another node right after the last message it passed on,
    /// so nothing is skipped or repeated. Fails only when no node answers for a whole
    /// request timeout.
    pub fn follow(
        &mut self,
        from: Seq,
        topic: Option<&str>,
        mut each: impl FnMut(MessageRecord) -> bool,
    ) -> Result<(), ClientError> {
        let mut next = from;
        let mut last_contact = Instant::now();
        loop {
            let node = self.target;
            let id = self.next_call;
            self.next_call += 1;
            let call = Call::Follow { from: next, topic: topic.map(str::to_owned) };
            let subscribed = self.ensure_connection(node).and_then(|()| {
                let payload = postcard::to_allocvec(&ClientRequest { id, call })
                    .expect("serialising to a Vec cannot fail");
                let bytes = frame::encode(FrameKind::Request, self.config.cluster_id, &payload);
                let stream = &mut self.connection.as_mut().expect("connected").stream;
                stream.write_all(&bytes).map_err(|e| ClientError::Unavailable(e.to_string()))
            });
            if subscribed.is_ok() {
                loop {
                    // A quiet stream is fine: wake up now and then only to honour interrupts.
                    let response = match self.read_frame(Instant::now() + Duration::from_secs(3600))
                    {
                        Ok(bytes) => bytes,
                        Err(ClientError::Interrupted) => return Err(ClientError::Interrupted),
                        Err(_) => break,
                    };
                    let Ok(response) = postcard::from_bytes::<ClientResponse>(&response) else {
                        break;
                    };
                    if response.id != id {
                        continue;
                    }
                    last_contact = Instant::now();
                    match response.reply {
                        Reply::Messages(messages) => {
                            for m in messages {
                                if m.seq < next {
                                    continue; // already passed on before a reconnect
                                }
                                next = Seq(m.seq.0 + 1);
                                if !each(m) {
                                    self.connection = None; // the node drops the stream with it
                                    return Ok(());
                                }
                            }
                        }
                        Reply::Error { code, message, .. } => {
                            return Err(ClientError::Refused { code, message });
                        }
                        other => return Err(shape::unexpected(other)),
                    }
                }
            }
            self.connection = None;
            if last_contact.elapsed() > self.config.request_timeout {
                return Err(ClientError::Unavailable("no node serves the stream".into()));
            }
            self.target = (node + 1) % self.config.nodes.len();
            self.pause(Duration::from_millis(50), Instant::now() + Duration::from_millis(50))?;
        }
    }

    /// The status of one node, by its index in the configured list (no redirects).
    pub fn status_of(&mut self, node: usize) -> Result<NodeStatus, ClientError> {
        let deadline = Instant::now() + self.config.request_timeout;
        match self.call_at(node, &Call::Status, deadline)? {
            Reply::Status(status) => Ok(status),
            other => Err(shape::unexpected(other)),
        }
    }

    /// Sends a call to the leader, following redirects and retrying elsewhere until the deadline.
    pub fn call(&mut self, call: Call) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut last_error = ClientError::Unavailable("no node tried".into());
        let mut reached_any = false;
        loop {
            if Instant::now() >= deadline {
                return Err(if reached_any { ClientError::Timeout } else { last_error });
            }
            let node = self.target;
            match self.call_at(node, &call, deadline) {
                Ok(Reply::Error { code: ErrorCode::NotLeader, leader, .. }) => {
                    reached_any = true;
                    self.target = leader
                        .and_then(|l| self.config.nodes.iter().position(|n| *n == l))
                        .unwrap_or((node + 1) % self.config.nodes.len());
                    if self.target == node {
                        self.target = (node + 1) % self.config.nodes.len();
                    }
                    self.pause(Duration::from_millis(20), deadline)?;
                }
                Ok(Reply::Error { code: ErrorCode::Overloaded, .. }) => {
                    reached_any = true;
                    self.pause(Duration::from_millis(10), deadline)?; // same node, shortly
                }
                Ok(Reply::Error { code, message, .. }) if code.is_retryable() => {
                    reached_any = true;
                    last_error = ClientError::Refused { code, message };
                    self.target = (node + 1) % self.config.nodes.len();
                }
                Ok(Reply::Error { code, message, .. }) => {
                    return Err(ClientError::Refused { code, message });
                }
                Ok(reply) => return Ok(reply),
                Err(ClientError::Interrupted) => return Err(ClientError::Interrupted),
                Err(ClientError::Timeout) => {
                    reached_any = true;
                    self.connection = None;
                    self.target = (node + 1) % self.config.nodes.len();
                }
                Err(e) => {
                    last_error = e;
                    self.connection = None;
                    self.target = (node + 1) % self.config.nodes.len();
                    self.pause(Duration::from_millis(20), deadline)?;
                }
            }
        }
    }

    /// One attempt at one node: at most until `deadline`, and at most one request timeout
    /// slice per node so a silent node does not eat the whole deadline.
    fn call_at(
        &mut self,
        node: usize,
        call: &Call,
        deadline: Instant,
    ) -> Result<Reply, ClientError> {
        let id = self.next_call;
        self.next_call += 1;
        let payload = postcard::to_allocvec(&ClientRequest { id, call: call.clone() })
            .expect("serialising to a Vec cannot fail");
        let bytes = frame::encode(FrameKind::Request, self.config.cluster_id, &payload);
        let attempt_deadline = deadline.min(Instant::now() + self.config.request_timeout / 3);
        self.ensure_connection(node)?;
        let stream = &mut self.connection.as_mut().expect("connected").stream;
        if let Err(e) = stream.write_all(&bytes) {
            self.connection = None;
            return Err(ClientError::Unavailable(format!("{}: {e}", self.config.nodes[node])));
        }
        loop {
            let response = self.read_frame(attempt_deadline)?;
            let response: ClientResponse = postcard::from_bytes(&response)
                .map_err(|e| ClientError::Protocol(format!("undecodable response: {e}")))?;
            if response.id == id {
                return Ok(response.reply);
            }
            // An answer to an earlier, abandoned attempt on this connection: skip it.
        }
    }

    fn ensure_connection(&mut self, node: usize) -> Result<(), ClientError> {
        if self.connection.as_ref().is_some_and(|c| c.node == node) {
            return Ok(());
        }
        self.connection = None;
        let address = &self.config.nodes[node];
        let addrs: Vec<SocketAddr> = address
            .to_socket_addrs()
            .map_err(|e| ClientError::Unavailable(format!("{address}: {e}")))?
            .collect();
        let mut last = format!("{address}: no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.config.connect_timeout) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    self.connection = Some(Connection {
                        node,
                        stream,
                        received: Vec::new(),
                        chunk: vec![0; 16 * 1024].into_boxed_slice(),
                        read_timeout: None,
                    });
                    return Ok(());
                }
                Err(e) => last = format!("{address}: {e}"),
            }
        }
        Err(ClientError::Unavailable(last))
    }

    fn read_frame(&mut self, deadline: Instant) -> Result<Vec<u8>, ClientError> {
        let mut header = [0u8; HEADER_BYTES];
        self.read_exact(&mut header, deadline)?;
        let parsed =
            frame::decode_header(&header, self.config.cluster_id, self.config.max_frame_bytes)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut payload = vec![0u8; parsed.length];
        self.read_exact(&mut payload, deadline)?;
        frame::check_payload(&parsed, &payload)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(payload)
    }

    /// Reads exactly `buf.len()` bytes, waking every poll interval to call the interrupt hook.
    fn read_exact(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), ClientError> {
        let mut filled = 0;
        loop {
            let connection = self.connection.as_mut().expect("connected");
            let take = connection.received.len().min(buf.len() - filled);
            buf[filled..filled + take].copy_from_slice(&connection.received[..take]);
            connection.received.drain(..take);
            filled += take;
            if filled == buf.len() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                self.connection = None;
                return Err(ClientError::Timeout);
            }
            if self.interrupt.as_mut().is_some_and(|hook| hook()) {
                self.connection = None;
                return Err(ClientError::Interrupted);
            }
            let wait =
                (deadline - now).min(self.config.poll_interval).max(Duration::from_millis(1));
            let connection = self.connection.as_mut().expect("connected");
            if connection.read_timeout != Some(wait) {
                let _ = connection.stream.set_read_timeout(Some(wait));
                connection.read_timeout = Some(wait);
            }
            match connection.stream.read(&mut connection.chunk) {
                Ok(0) => {
                    self.connection = None;
                    return Err(ClientError::Unavailable("connection closed by the node".into()));
                }
                Ok(n) => {
                    let Connection { received, chunk, .. } = connection;
                    received.extend_from_slice(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    self.connection = None;
                    return Err(ClientError::Unavailable(e.to_string()));
                }
            }
        }
    }

    fn pause(&mut self, duration: Duration, deadline: Instant) -> Result<(), ClientError> {
        let until = (Instant::now() + duration).min(deadline);
        while Instant::now() < until {
            if self.interrupt.as_mut().is_some_and(|hook| hook()) {
                return Err(ClientError::Interrupted);
            }
            std::thread::sleep(self.config.poll_interval.min(until - Instant::now()));
        }
        Ok(())
    }
}

pub fn claim_key(namespace: &str, key: &str) -> ClaimKey {
    ClaimKey { namespace: namespace.into(), key: key.into() }
}

/// Reads pages of `page` ids in order, each after the last one's end, until one is shorter than
/// `page` (the last there is) or `limit` ids are in. Every page is read at its own moment, so
/// only a listing that fits in the first page is of one state: an id that appeared between
/// two reads below the first page's end is in neither. (Until 2026-12-07 the reconciler read
/// on until an empty page, 1,000 at a time: its second, empty-looking read came a second
/// later under a network delay, after ids had appeared on both sides of the first page's
/// end, and it listed the younger ones without an older one — whose messages then went
/// after theirs.)
pub fn collect_pages<E>(
    page: usize,
    limit: usize,
    mut fetch: impl FnMut(Option<String>) -> Result<Vec<String>, E>,
) -> Result<Vec<String>, E> {
    let mut all: Vec<String> = Vec::new();
    loop {
        let got = fetch(all.last().cloned())?;
        let short = got.len() < page;
        all.extend(got);
        if short || all.len() >= limit {
            return Ok(all);
        }
    }
}

#[cfg(test)]
mod pages_tests {
    use super::collect_pages;

    /// Pages of `page` ids from `ids` (sorted), after `after`; every call is logged.
    fn pages_of(
        ids: &[&str],
        page: usize,
        calls: &mut Vec<Option<String>>,
        after: Option<String>,
    ) -> Result<Vec<String>, ()> {
        calls.push(after.clone());
        Ok(ids
            .iter()
            .filter(|id| after.as_deref().is_none_or(|a| **id > a))
            .take(page)
            .map(|id| id.to_string())
            .collect())
    }

    #[test]
    fn a_listing_that_fits_in_a_page_is_read_once() {
        let mut calls = Vec::new();
        let ids = ["a", "b", "c"];
        let all = collect_pages(5, 100, |after| pages_of(&ids, 5, &mut calls, after)).unwrap();
        assert_eq!(all, ["a", "b", "c"]);
        assert_eq!(calls, [None], "no second read: it could see another state");
    }

    #[test]
    fn full_pages_are_followed_after_their_last_id_up_to_the_limit() {
        let ids = ["a", "b", "c", "d", "e", "f", "g"];
        let mut calls = Vec::new();
        let all = collect_pages(3, 100, |after| pages_of(&ids, 3, &mut calls, after)).unwrap();
        assert_eq!(all, ids);
        assert_eq!(calls, [None, Some("c".to_string()), Some("f".to_string())]);
        // Exactly full pages: one more read finds nothing.
        let mut calls = Vec::new();
        let all = collect_pages(3, 100, |after| pages_of(&ids[..6], 3, &mut calls, after)).unwrap();
        assert_eq!((all.len(), calls.len()), (6, 3));
        let mut calls = Vec::new();
        let all = collect_pages(3, 4, |after| pages_of(&ids, 3, &mut calls, after)).unwrap();
        assert_eq!((all.len(), calls.len()), (6, 2), "stops once the limit is reached");
    }

    #[test]
    fn an_error_ends_the_listing() {
        let mut n = 0;
        let got = collect_pages(1, 100, |_| {
            n += 1;
            if n == 2 { Err("lost") } else { Ok(vec![format!("id{n}")]) }
        });
        assert_eq!(got, Err("lost"));
    }
}
