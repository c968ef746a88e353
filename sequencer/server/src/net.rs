//! Actors at the network boundary: one outbound link per peer (reconnecting with backoff,
//! never blocking the node), and one actor per inbound connection (peer or client) that
//! decodes frames and hands them to the node.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::io::{FramedWrite, WriteHandler};
use actix::prelude::*;
use tob_proto::frame::FrameKind;
use tob_proto::{ClientRequest, ClientResponse, ErrorCode, Reply};
use tob_raft::Message;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;

use crate::codec::{CodecError, FrameCodec};
use crate::metrics::Metrics;
use crate::node::{ClientCall, NodeActor, PeerMessage, SendResponse};

/// Messages kept for a peer while it is unreachable; older ones are dropped (Raft resends).
const PEER_QUEUE_MAX: usize = 4096;
const BACKOFF_MIN_MS: u64 = 20;
const BACKOFF_MAX_MS: u64 = 1_000;

type Writer = FramedWrite<(FrameKind, Vec<u8>), OwnedWriteHalf, FrameCodec>;

/// A Raft message to send to this link's peer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Outbound(pub Message);

/// The outbound connection to one peer.
pub struct PeerLink {
    address: SocketAddr,
    codec: FrameCodec,
    writer: Option<Writer>,
    connecting: bool,
    /// The writer failed and is about to be replaced.
    broken: bool,
    backoff_ms: u64,
    queue: VecDeque<Message>,
}

impl PeerLink {
    pub fn new(address: SocketAddr, codec: FrameCodec) -> PeerLink {
        PeerLink {
            address,
            codec,
            writer: None,
            connecting: false,
            broken: false,
            backoff_ms: BACKOFF_MIN_MS,
            queue: VecDeque::new(),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.connecting || self.writer.is_some() {
            return;
        }
        self.connecting = true;
        let address = self.address;
        let attempt = async move {
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(address)).await
        };
        ctx.spawn(attempt.into_actor(self).map(|result, link, ctx| {
            link.connecting = false;
            match result {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let (_, write) = stream.into_split();
                    link.writer = Some(FramedWrite::new(write, link.codec, ctx));
                    link.backoff_ms = BACKOFF_MIN_MS;
                    tracing::info!(peer = %link.address, "connected to peer");
                    while let Some(message) = link.queue.pop_front() {
                        link.write(message);
                    }
                }
                _ => link.retry_later(ctx),
            }
        }));
    }

    fn retry_later(&mut self, ctx: &mut Context<Self>) {
        let delay = Duration::from_millis(self.backoff_ms);
        self.backoff_ms = (self.backoff_ms * 2).min(BACKOFF_MAX_MS);
        ctx.run_later(delay, |link, ctx| link.connect(ctx));
    }

    fn write(&mut self, message: Message) {
        let payload = postcard::to_allocvec(&message).expect("serialising to a Vec cannot fail");
        if let Some(writer) = &mut self.writer {
            writer.write((FrameKind::Peer, payload));
        }
    }
}

impl Actor for PeerLink {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        self.connect(ctx);
    }
}

impl Handler<Outbound> for PeerLink {
    type Result = ();
    fn handle(&mut self, Outbound(message): Outbound, ctx: &mut Context<Self>) {
        if self.writer.is_some() && !self.broken {
            self.write(message);
        } else {
            if self.queue.len() >= PEER_QUEUE_MAX {
                self.queue.pop_front();
            }
            self.queue.push_back(message);
            self.connect(ctx);
        }
    }
}

impl WriteHandler<CodecError> for PeerLink {
    fn error(&mut self, error: CodecError, _: &mut Context<Self>) -> Running {
        tracing::warn!(peer = %self.address, %error, "peer connection lost");
        // Stop this writer (actix then calls `finished`, which reconnects).
        Running::Stop
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.reconnect_soon(ctx);
    }
}

impl PeerLink {
    /// Drops the broken writer outside its own callback (it is borrowed while it reports),
    /// then reconnects after the backoff.
    fn reconnect_soon(&mut self, ctx: &mut Context<Self>) {
        if self.broken {
            return;
        }
        self.broken = true;
        ctx.run_later(Duration::ZERO, |link, ctx| {
            link.writer = None;
            link.broken = false;
            link.retry_later(ctx);
        });
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Peer,
    Client,
}

/// One inbound connection.
pub struct Connection {
    node: Addr<NodeActor>,
    metrics: Arc<Metrics>,
    /// Requests forwarded to the node and not yet answered, and the bound on them.
    in_flight: usize,
    max_in_flight: usize,
    /// Ids of follow streams (answered many times, never counted as in flight).
    streams: std::collections::BTreeSet<u64>,
    writer: Writer,
    remote: SocketAddr,
    kind: ListenerKind,
}

impl Connection {
    /// Closes after what was written is flushed (the writer then stops the actor).
    fn close(&mut self, reason: &str) {
        tracing::warn!(remote = %self.remote, kind = ?self.kind, reason, "closing connection");
        self.writer.close();
    }

    fn respond(&mut self, response: ClientResponse) {
        let payload = postcard::to_allocvec(&response).expect("serialising to a Vec cannot fail");
        self.writer.write((FrameKind::Response, payload));
    }
}

impl Actor for Connection {
    type Context = Context<Self>;
}

impl StreamHandler<Result<(FrameKind, Vec<u8>), CodecError>> for Connection {
    /// The peer closed its side or the stream failed: flush what is pending, then stop.
    fn finished(&mut self, _: &mut Context<Self>) {
        self.writer.close();
    }

    fn handle(&mut self, item: Result<(FrameKind, Vec<u8>), CodecError>, ctx: &mut Context<Self>) {
        match (item, self.kind) {
            (Ok((FrameKind::Peer, payload)), ListenerKind::Peer) => {
                match postcard::from_bytes::<Message>(&payload) {
                    Ok(message) => self.node.do_send(PeerMessage(message)),
                    Err(e) => self.close(&format!("undecodable peer message: {e}")),
                }
            }
            (Ok((FrameKind::Request, payload)), ListenerKind::Client) => {
                match postcard::from_bytes::<ClientRequest>(&payload) {
                    Ok(request) => {
                        let follow = matches!(request.call, tob_proto::Call::Follow { .. });
                        if !follow && self.in_flight >= self.max_in_flight {
                            // Push back instead of queueing without bound in the node.
                            let reply = Reply::Error {
                                code: ErrorCode::Overloaded,
                                message: format!(
                                    "more than {} requests in flight on one connection",
                                    self.max_in_flight
                                ),
                                leader: None,
                            };
                            return self.respond(ClientResponse { id: request.id, reply });
                        }
                        if follow {
                            self.streams.insert(request.id);
                        } else {
                            self.in_flight += 1;
                        }
                        self.node.do_send(ClientCall {
                            connection: ctx.address().recipient(),
                            id: request.id,
                            call: request.call,
                        });
                    }
                    Err(e) => {
                        let message = format!(
                            "undecodable request (an operation this node does not know: is the \
                             client newer than the node?): {e}"
                        );
                        let reply = Reply::Error {
                            code: ErrorCode::Malformed,
                            message: message.clone(),
                            leader: None,
                        };
                        // Answer with the request's own id when it can be read, so the client
                        // fails at once (malformed is not retryable) instead of retrying
                        // elsewhere until its deadline.
                        let id = postcard::take_from_bytes::<u64>(&payload).map_or(0, |(id, _)| id);
                        self.respond(ClientResponse { id, reply });
                        self.close(&message);
                    }
                }
            }
            (Ok((kind, _)), listener) => {
                self.close(&format!("{kind:?} frame on the {listener:?} port"))
            }
            (Err(error), _) => {
                self.metrics.refused_frames.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let CodecError::Frame(frame_error) = &error {
                    let reply = Reply::Error {
                        code: frame_error.code(),
                        message: error.to_string(),
                        leader: None,
                    };
                    if self.kind == ListenerKind::Client {
                        self.respond(ClientResponse { id: 0, reply });
                    }
                }
                self.close(&error.to_string());
            }
        }
    }
}

impl Handler<SendResponse> for Connection {
    type Result = ();
    fn handle(&mut self, SendResponse(response): SendResponse, _: &mut Context<Self>) {
        if !self.streams.contains(&response.id) {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        self.respond(response);
    }
}

impl WriteHandler<CodecError> for Connection {}

/// Accepts connections forever, one `Connection` actor each.
pub async fn serve(
    listener: TcpListener,
    kind: ListenerKind,
    node: Addr<NodeActor>,
    codec: FrameCodec,
    metrics: Arc<Metrics>,
    max_in_flight: usize,
) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                let node = node.clone();
                let metrics = metrics.clone();
                Connection::create(move |ctx| {
                    let (read, write) = stream.into_split();
                    ctx.add_stream(FramedRead::new(read, codec));
                    Connection {
                        node,
                        metrics,
                        in_flight: 0,
                        max_in_flight,
                        streams: Default::default(),
                        writer: FramedWrite::new(write, codec, ctx),
                        remote,
                        kind,
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, ?kind, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
