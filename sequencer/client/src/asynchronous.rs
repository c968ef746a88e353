//! The async client (feature `async`, for tools): the same calls as the blocking [`Client`],
//! but any number of them may be in flight at once, **pipelined on one connection per node**
//! and matched to their answers by call id.
//!
//! [`Client`]: crate::Client

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tob_proto::frame::{self, FrameKind, HEADER_BYTES};
use tob_proto::{
    Call, ClientId, ClientRequest, ClientResponse, Command, ErrorCode, MessageRecord, Outcome,
    OwnerInfo, ReadConsistency, Reply, Request, RequestId, Seq,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::{ClientConfig, ClientError, claim_key, shape};

type Pending = Arc<Mutex<BTreeMap<u64, oneshot::Sender<Reply>>>>;

/// Queued requests gathered into one write, up to about this many bytes.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// The reader's buffer: many small answers per system call.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// One pipelined connection: a writer task fed by a channel and a reader task that routes
/// answers to their callers.
#[derive(Clone)]
struct Connection {
    outbox: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    /// Set when the reader stops: the node closed the connection or sent garbage.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Connection {
    async fn open(address: &str, config: &ClientConfig) -> Result<Connection, ClientError> {
        let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| ClientError::Unavailable(format!("{address}: connect timed out")))?
            .map_err(|e| ClientError::Unavailable(format!("{address}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let (outbox, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
        let pending: Pending = Arc::default();
        tokio::spawn(async move {
            // Everything queued by the time the writer runs goes out in one write: with many
            // calls in flight, one system call (and one TCP segment for the node to read)
            // instead of one per request.
            let mut batch = Vec::new();
            while let Some(bytes) = queue.recv().await {
                batch.clear();
                batch.extend_from_slice(&bytes);
                while batch.len() < WRITE_BATCH_BYTES
                    && let Ok(more) = queue.try_recv()
                {
                    batch.extend_from_slice(&more);
                }
                if write.write_all(&batch).await.is_err() {
                    break;
                }
            }
        });
        let routes = pending.clone();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed_by_reader = closed.clone();
        let (cluster_id, max) = (config.cluster_id, config.max_frame_bytes);
        tokio::spawn(async move {
            // Buffered: one read takes in every answer that has arrived, not one call per
            // header and payload.
            let mut read = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, read);
            let mut header = [0u8; HEADER_BYTES];
            loop {
                if read.read_exact(&mut header).await.is_err() {
                    break;
                }
                let Ok(parsed) = frame::decode_header(&header, cluster_id, max) else { break };
                let mut payload = vec![0u8; parsed.length];
                if read.read_exact(&mut payload).await.is_err()
                    || frame::check_payload(&parsed, &payload).is_err()
                {
                    break;
                }
                let Ok(response) = postcard::from_bytes::<ClientResponse>(&payload) else { break };
                let waiter = routes.lock().expect("not poisoned").remove(&response.id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(response.reply);
                }
            }
            // Dropping the senders tells every waiting caller the connection is gone.
            closed_by_reader.store(true, Ordering::Relaxed);
            routes.lock().expect("not poisoned").clear();
        });
        Ok(Connection { outbox, pending, closed })
    }

    fn is_closed(&self) -> bool {
        self.outbox.is_closed() || self.closed.load(Ordering::Relaxed)
    }
}

/// An async client; cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct AsyncClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    client_id: ClientId,
    next_request: AtomicU64,
    next_call: AtomicU64,
    target: AtomicUsize,
    in_flight: Mutex<std::collections::BTreeSet<u64>>,
    connections: tokio::sync::Mutex<Vec<Option<Connection>>>,
}

impl AsyncClient {
    pub fn new(config: ClientConfig) -> AsyncClient {
        assert!(!config.nodes.is_empty(), "a client needs at least one node address");
        let slots = config.nodes.iter().map(|_| None).collect();
        AsyncClient {
            inner: Arc::new(Inner {
                client_id: ClientId(uuid::Uuid::new_v4().as_u128()),
                next_request: AtomicU64::new(1),
                next_call: AtomicU64::new(1),
                target: AtomicUsize::new(0),
                in_flight: Mutex::default(),
                connections: tokio::sync::Mutex::new(slots),
                config,
            }),
        }
    }

    /// Runs a state-machine command through the log, exactly once.
    pub async fn command(&self, command: Command) -> Result<Outcome, ClientError> {
        let request_id = RequestId(self.inner.next_request.fetch_add(1, Ordering::Relaxed));
        // The oldest request still in flight: the cluster may forget answers below it.
        let first_incomplete = {
            let mut in_flight = self.inner.in_flight.lock().expect("not poisoned");
            in_flight.insert(request_id.0);
            RequestId(*in_flight.first().expect("just inserted"))
        };
        let request =
            Request { client: Some(self.inner.client_id), request_id, first_incomplete, command };
        let reply = self.call(Call::Command(request)).await;
        self.inner.in_flight.lock().expect("not poisoned").remove(&request_id.0);
        shape::outcome(reply?)
    }

    pub async fn append(&self, topic: Option<&str>, payload: &[u8]) -> Result<Seq, ClientError> {
        shape::appended(self.command(shape::append(topic, payload)).await?)
    }

    pub async fn claim(
        &self,
        namespace: &str,
        key: &str,
        owner: &str,
    ) -> Result<Outcome, ClientError> {
        self.command(shape::claim(namespace, key, owner)).await
    }

    pub async fn release(
        &self,
        namespace: &str,
        key: &str,
        owner: &str,
    ) -> Result<Outcome, ClientError> {
        self.command(shape::release(namespace, key, owner)).await
    }

    /// Declares a namespace so that claims in it are accepted; false if it existed already.
    pub async fn create_namespace(&self, name: &str) -> Result<bool, ClientError> {
        let command = Command::CreateNamespace { name: name.into() };
        shape::namespace_created(self.command(command).await?)
    }

    pub async fn next(&self, counter: &str) -> Result<u64, ClientError> {
        shape::counter(self.command(Command::Next { counter: counter.into() }).await?)
    }

    pub async fn owner(
        &self,
        namespace: &str,
        key: &str,
        consistency: ReadConsistency,
    ) -> Result<Option<OwnerInfo>, ClientError> {
        let key = claim_key(namespace, key);
        if consistency == ReadConsistency::Log {
            return shape::owner_in_log(self.command(Command::Read { key }).await?);
        }
        shape::owner(self.call(Call::Owner { key, consistency }).await?)
    }

    /// Up to `max` messages from `from` on (optionally of one topic), read page by page: fewer
    /// than `max` only when there were no more when the last page was read.
    pub async fn read_messages(
        &self,
        from: Seq,
        max: u32,
        topic: Option<&str>,
    ) -> Result<Vec<MessageRecord>, ClientError> {
        let mut messages = Vec::new();
        let mut reading = shape::Reading::new(from, max);
        while !reading.done {
            let (page, complete) = shape::messages_page(
                self.call(Call::ReadMessagesPage {
                    from: reading.from,
                    max: reading.max,
                    topic: topic.map(str::to_owned),
                })
                .await?,
            )?;
            reading.advance(&page, complete);
            messages.extend(page);
        }
        Ok(messages)
    }

    pub async fn sync(&self) -> Result<u64, ClientError> {
        shape::synced(self.call(Call::Sync).await?)
    }

    /// The declared namespaces, in order (linearizable: after a ReadIndex).
    pub async fn namespaces(&self) -> Result<Vec<String>, ClientError> {
        shape::namespaces(self.call(Call::Namespaces).await?)
    }

    /// Sends a call to the leader, following redirects and retrying elsewhere until the deadline.
    pub async fn call(&self, call: Call) -> Result<Reply, ClientError> {
        let config = &self.inner.config;
        let deadline = Instant::now() + config.request_timeout;
        let mut last_error = ClientError::Unavailable("no node tried".into());
        let mut reached_any = false;
        let nodes = config.nodes.len();
        while Instant::now() < deadline {
            let node = self.inner.target.load(Ordering::Relaxed) % nodes;
            let next = (node + 1) % nodes;
            match self.call_at(node, &call, deadline).await {
                Ok(Reply::Error { code: ErrorCode::NotLeader, leader, .. }) => {
                    reached_any = true;
                    let hinted = leader
                        .and_then(|l| config.nodes.iter().position(|n| *n == l))
                        .filter(|&l| l != node);
                    let _ = self.inner.target.compare_exchange(
                        node,
                        hinted.unwrap_or(next),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Reply::Error { code: ErrorCode::Overloaded, .. }) => {
                    reached_any = true;
                    tokio::time::sleep(Duration::from_millis(10)).await; // same node, shortly
                }
                Ok(Reply::Error { code, message, .. }) if code.is_retryable() => {
                    reached_any = true;
                    last_error = ClientError::Refused { code, message };
                    let _ = self.inner.target.compare_exchange(
                        node,
                        next,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                Ok(Reply::Error { code, message, .. }) => {
                    return Err(ClientError::Refused { code, message });
                }
                Ok(reply) => return Ok(reply),
                Err(ClientError::Timeout) => {
                    reached_any = true;
                    let _ = self.inner.target.compare_exchange(
                        node,
                        next,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                Err(e) => {
                    last_error = e;
                    let _ = self.inner.target.compare_exchange(
                        node,
                        next,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(if reached_any { ClientError::Timeout } else { last_error })
    }

    async fn call_at(
        &self,
        node: usize,
        call: &Call,
        deadline: Instant,
    ) -> Result<Reply, ClientError> {
        let config = &self.inner.config;
        let connection = {
            let mut slots = self.inner.connections.lock().await;
            match &slots[node] {
                Some(c) if !c.is_closed() => c.clone(),
                _ => {
                    let c = Connection::open(&config.nodes[node], config).await?;
                    slots[node] = Some(c.clone());
                    c
                }
            }
        };
        let id = self.inner.next_call.fetch_add(1, Ordering::Relaxed);
        let payload = postcard::to_allocvec(&ClientRequest { id, call: call.clone() })
            .expect("serialising to a Vec cannot fail");
        let (tx, rx) = oneshot::channel();
        connection.pending.lock().expect("not poisoned").insert(id, tx);
        if connection
            .outbox
            .send(frame::encode(FrameKind::Request, config.cluster_id, &payload))
            .is_err()
        {
            connection.pending.lock().expect("not poisoned").remove(&id);
            return Err(ClientError::Unavailable(format!(
                "{}: connection closed",
                config.nodes[node]
            )));
        }
        let attempt = deadline.min(Instant::now() + config.request_timeout / 3);
        match tokio::time::timeout_at(attempt, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => {
                Err(ClientError::Unavailable(format!("{}: connection closed", config.nodes[node])))
            }
            Err(_) => {
                connection.pending.lock().expect("not poisoned").remove(&id);
                Err(ClientError::Timeout)
            }
        }
    }
}
