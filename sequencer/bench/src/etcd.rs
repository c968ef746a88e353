//! The same workloads against etcd, for side-by-side figures on the same machine: puts for
//! `append`, create-if-absent transactions for `claim` (compare create_revision = 0, then
//! put), linearizable range reads for `read` and `sync`. Speaks gRPC, as etcd's own clients
//! and its benchmark tool do: HTTP/2 to the leader, protobuf messages encoded here (five
//! small messages do not need a code generator), all tasks sharing one HTTP/2 connection as
//! etcd's client library does. An earlier version went through etcd's JSON gateway, which
//! adds a hop and JSON work inside etcd: its puts at 256 in flight measured about 4,000/s that
//! way against 7,100–7,500/s over gRPC, which flattered tob's ratios.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{RunResult, Shared, claim_id, histogram_totals};

/// One HTTP/2 connection to an etcd member, carrying gRPC calls (several at once when shared).
#[derive(Clone)]
struct Grpc {
    send: h2::client::SendRequest<Bytes>,
    authority: String,
}

impl Grpc {
    async fn connect(host: &str) -> std::io::Result<Grpc> {
        let stream = TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        // A large connection window: h2 budgets small DATA frames (each gRPC answer is one)
        // against it, and with the default a few thousand answers a second on one connection
        // end it with ENHANCE_YOUR_CALM.
        let (send, connection) = h2::client::Builder::new()
            .initial_connection_window_size(16 << 20)
            .handshake(stream)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Grpc { send, authority: host.to_owned() })
    }

    /// One unary call (`service/Method`, e.g. `KV/Put`): the response message, or an error for
    /// a transport failure or a gRPC status other than OK.
    async fn call(&self, method: &str, message: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/etcdserverpb.{method}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(std::io::Error::other)?;
        let mut send = self.send.clone().ready().await.map_err(std::io::Error::other)?;
        let (response, mut outgoing) =
            send.send_request(request, false).map_err(std::io::Error::other)?;
        // A gRPC message: not compressed (0), its length (big-endian u32), the message.
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.push(0);
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        outgoing.send_data(Bytes::from(framed), true).map_err(std::io::Error::other)?;
        let (head, mut body) = response.await.map_err(std::io::Error::other)?.into_parts();
        // A failed call may answer with headers only, the status among them.
        check_status(&head.headers)?;
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        if let Some(trailers) = body.trailers().await.map_err(std::io::Error::other)? {
            check_status(&trailers)?;
        }
        if data.len() < 5 {
            return Err(std::io::Error::other("gRPC response without a message"));
        }
        Ok(data.split_off(5))
    }
}

fn check_status(headers: &http::HeaderMap) -> std::io::Result<()> {
    match headers.get("grpc-status").map(|v| v.as_bytes()) {
        None | Some(b"0") => Ok(()),
        Some(code) => Err(std::io::Error::other(format!(
            "gRPC status {}: {}",
            String::from_utf8_lossy(code),
            headers
                .get("grpc-message")
                .map(|m| String::from_utf8_lossy(m.as_bytes()))
                .unwrap_or_default()
        ))),
    }
}

/// Protocol buffers, the little of it these calls need.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut value: u64) {
        while value >= 0x80 {
            out.push(value as u8 | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    pub fn uint(out: &mut Vec<u8>, field: u64, value: u64) {
        varint(out, field << 3);
        varint(out, value);
    }

    pub fn bytes(out: &mut Vec<u8>, field: u64, value: &[u8]) {
        varint(out, field << 3 | 2);
        varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }

    /// `PutRequest { key = 1, value = 2 }`.
    pub fn put_request(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        bytes(&mut out, 1, key);
        bytes(&mut out, 2, value);
        out
    }

    /// `RangeRequest { key = 1 }`: linearizable (serializable = false, the default).
    pub fn range_request(key: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        bytes(&mut out, 1, key);
        out
    }

    /// `TxnRequest`: if `key`'s create revision is 0 (absent), put `value`, else read it.
    pub fn create_if_absent(key: &[u8], value: &[u8]) -> Vec<u8> {
        // Compare { result = 1: EQUAL (0), target = 2: CREATE (1), key = 3, create_revision = 5 }
        let mut compare = Vec::new();
        uint(&mut compare, 1, 0);
        uint(&mut compare, 2, 1);
        bytes(&mut compare, 3, key);
        uint(&mut compare, 5, 0);
        // RequestOp { request_range = 1, request_put = 2 }
        let (mut success, mut failure) = (Vec::new(), Vec::new());
        bytes(&mut success, 2, &put_request(key, value));
        bytes(&mut failure, 1, &range_request(key));
        // TxnRequest { compare = 1, success = 2, failure = 3 }
        let mut out = Vec::new();
        bytes(&mut out, 1, &compare);
        bytes(&mut out, 2, &success);
        bytes(&mut out, 3, &failure);
        out
    }

    /// A message's top-level varint field (absent means 0 in proto3); None if malformed.
    pub fn varint_field(message: &[u8], wanted: u64) -> Option<u64> {
        match last_field(message, wanted)? {
            None => Some(0),
            Some(Value::Varint(value)) => Some(value),
            Some(Value::Bytes(_)) => None,
        }
    }

    /// A message's top-level length-delimited field (empty when absent); None if malformed.
    pub fn bytes_field(message: &[u8], wanted: u64) -> Option<&[u8]> {
        match last_field(message, wanted)? {
            None => Some(&[]),
            Some(Value::Bytes(bytes)) => Some(bytes),
            Some(Value::Varint(_)) => None,
        }
    }

    enum Value<'a> {
        Varint(u64),
        Bytes(&'a [u8]),
    }

    /// The last top-level field numbered `wanted` (protobuf's rule when one repeats), skipping
    /// the others whatever their wire type; None if the message is malformed.
    fn last_field(mut message: &[u8], wanted: u64) -> Option<Option<Value<'_>>> {
        let mut found = None;
        while !message.is_empty() {
            let key = read_varint(&mut message)?;
            let value = match key & 7 {
                0 => Value::Varint(read_varint(&mut message)?),
                2 => {
                    let len = read_varint(&mut message)? as usize;
                    let bytes = message.get(..len)?;
                    message = &message[len..];
                    Value::Bytes(bytes)
                }
                // Fixed 64- and 32-bit fields: never wanted here, only skipped.
                1 => {
                    message = message.get(8..)?;
                    continue;
                }
                5 => {
                    message = message.get(4..)?;
                    continue;
                }
                _ => return None,
            };
            if key >> 3 == wanted {
                found = Some(value);
            }
        }
        Some(found)
    }

    fn read_varint(input: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = input.split_first()?;
            *input = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

/// The endpoint of the current leader (etcd forwards proposals, but that adds a hop).
async fn leader(endpoints: &[String]) -> Option<String> {
    for endpoint in endpoints {
        let Ok(grpc) = Grpc::connect(endpoint).await else { continue };
        // StatusResponse { header = 1 (ResponseHeader { member_id = 2 }), leader = 4 }
        let Ok(status) = grpc.call("Maintenance/Status", Vec::new()).await else { continue };
        let member = pb::bytes_field(&status, 1).and_then(|header| pb::varint_field(header, 2));
        if member.is_some() && member == pb::varint_field(&status, 4) {
            return Some(endpoint.clone());
        }
    }
    None
}

pub async fn run(
    endpoints: &[String],
    workload: &str,
    concurrency: usize,
    duration: Duration,
) -> RunResult {
    let target = leader(endpoints).await.unwrap_or_else(|| endpoints[0].clone());
    let Shared { stop, errors, last_claimed, run_id } = Shared::new();
    // One HTTP/2 connection shared by every task, as etcd's client library keeps one.
    let grpc = match Grpc::connect(&target).await {
        Ok(grpc) => grpc,
        Err(e) => {
            eprintln!("etcd at {target}: {e}");
            return RunResult::from_latencies(Vec::new(), duration, 1);
        }
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (stop, errors, last_claimed) = (stop.clone(), errors.clone(), last_claimed.clone());
            let workload = workload.to_owned();
            let grpc = grpc.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let began = Instant::now();
                    let result = match workload.as_str() {
                        "append" => {
                            let key = format!("bench/{run_id}/{t}/{i}");
                            let put = pb::put_request(key.as_bytes(), b"0123456789abcdef");
                            grpc.call("KV/Put", put).await.map(drop)
                        }
                        "claim" => {
                            let id = claim_id(&last_claimed, t, i);
                            let key = format!("claims/{run_id}-{id}");
                            let txn =
                                pb::create_if_absent(key.as_bytes(), format!("t{t}").as_bytes());
                            let response = grpc.call("KV/Txn", txn).await;
                            // TxnResponse { succeeded = 2 }
                            if let Ok(message) = &response
                                && pb::varint_field(message, 2) == Some(1)
                            {
                                last_claimed.store(id, Ordering::Relaxed);
                            }
                            response.map(drop)
                        }
                        _ => {
                            grpc.call("KV/Range", pb::range_request(b"claims/hot")).await.map(drop)
                        }
                    };
                    match result {
                        Ok(()) => latencies.push(began.elapsed().as_micros() as u64),
                        Err(e) => {
                            // The first error says what went wrong; the count says how often.
                            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("etcd: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    RunResult::from_latencies(all, started.elapsed(), errors.load(Ordering::Relaxed))
}

/// Sum (seconds) and count of WAL fsyncs across the members, from their /metrics.
pub async fn fsync_totals(endpoints: &[String]) -> Option<(f64, u64)> {
    let (mut sum, mut count) = (0.0, 0);
    for endpoint in endpoints {
        let mut stream = TcpStream::connect(endpoint).await.ok()?;
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        let (s, c) = histogram_totals(&body, "etcd_disk_wal_fsync_duration_seconds")?;
        sum += s;
        count += c;
    }
    Some((sum, count))
}

#[cfg(test)]
mod tests {
    use super::pb;

    #[test]
    fn histogram_totals_read_sum_and_count_of_the_named_histogram_only() {
        let page = "x_sum 9\nx_count 9\netcd_disk_wal_fsync_duration_seconds_bucket{le=\"1\"} 3\n\
                    etcd_disk_wal_fsync_duration_seconds_sum 0.5\n\
                    etcd_disk_wal_fsync_duration_seconds_count 4\n";
        assert_eq!(
            crate::histogram_totals(page, "etcd_disk_wal_fsync_duration_seconds"),
            Some((0.5, 4))
        );
    }

    #[test]
    fn varints_use_seven_bits_a_byte_low_bits_first() {
        let encode = |v| {
            let mut out = Vec::new();
            pb::varint(&mut out, v);
            out
        };
        assert_eq!(encode(0), [0]);
        assert_eq!(encode(1), [1]);
        assert_eq!(encode(300), [0xac, 0x02]);
        assert_eq!(encode(u64::MAX).len(), 10);
    }

    #[test]
    fn a_put_request_is_key_then_value_as_length_delimited_fields() {
        assert_eq!(pb::put_request(b"k", b"vv"), [0x0a, 1, b'k', 0x12, 2, b'v', b'v']);
    }

    #[test]
    fn create_if_absent_compares_the_create_revision_with_zero() {
        let txn = pb::create_if_absent(b"k", b"v");
        let compare = pb::bytes_field(&txn, 1).unwrap();
        assert_eq!(compare, [0x08, 0, 0x10, 1, 0x1a, 1, b'k', 0x28, 0]);
        let success = pb::bytes_field(&txn, 2).unwrap();
        assert_eq!(pb::bytes_field(success, 2).unwrap(), pb::put_request(b"k", b"v"));
        let failure = pb::bytes_field(&txn, 3).unwrap();
        assert_eq!(pb::bytes_field(failure, 1).unwrap(), pb::range_request(b"k"));
    }

    #[test]
    fn fields_are_found_past_others_of_every_wire_type_and_absent_ones_read_as_zero() {
        // header (bytes), a fixed64, a fixed32, then succeeded = 2 (varint 1).
        let mut message = Vec::new();
        pb::bytes(&mut message, 1, &[0x10, 7]);
        message.extend_from_slice(&[0x19, 0, 0, 0, 0, 0, 0, 0, 0]);
        message.extend_from_slice(&[0x25, 0, 0, 0, 0]);
        pb::uint(&mut message, 2, 1);
        assert_eq!(pb::varint_field(&message, 2), Some(1));
        assert_eq!(pb::varint_field(&message, 9), Some(0));
        assert_eq!(pb::bytes_field(&message, 1).and_then(|h| pb::varint_field(h, 2)), Some(7));
        // Cut short inside the header: malformed, not a quiet zero.
        assert_eq!(pb::varint_field(&message[..2], 2), None);
    }
}
