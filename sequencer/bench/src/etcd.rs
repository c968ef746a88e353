//! The same workloads against etcd, for side-by-side figures on the same machine: puts for
//! `append`, create-if-absent transactions for `claim` (compare create_revision = 0, then
//! put), linearizable range reads for `read` and `sync`. Speaks etcd's v3 JSON gateway over
//! HTTP/1.1 with keep-alive, one connection per task to the leader (etcd's gRPC clients
//! would be somewhat cheaper for etcd's CPU; the disk work is the same).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::{RunResult, Shared, claim_id, histogram_totals};

/// One keep-alive HTTP connection.
struct Http {
    host: String,
    stream: BufReader<TcpStream>,
}

impl Http {
    async fn connect(host: &str) -> std::io::Result<Http> {
        let stream = TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        Ok(Http { host: host.to_owned(), stream: BufReader::new(stream) })
    }

    async fn post(&mut self, path: &str, body: &Value) -> std::io::Result<Value> {
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut length = 0usize;
        let mut line = String::new();
        let mut status_ok = false;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            let trimmed = line.trim_end();
            if trimmed.starts_with("HTTP/1.1 ") {
                status_ok = trimmed.starts_with("HTTP/1.1 200");
            } else if let Some(v) = trimmed.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            } else if trimmed.is_empty() {
                break;
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        if !status_ok {
            return Err(std::io::Error::other(String::from_utf8_lossy(&body).into_owned()));
        }
        serde_json::from_slice(&body).map_err(std::io::Error::other)
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The endpoint of the current leader (etcd forwards proposals, but that adds a hop).
async fn leader(endpoints: &[String]) -> Option<String> {
    for endpoint in endpoints {
        let Ok(mut http) = Http::connect(endpoint).await else { continue };
        let Ok(status) = http.post("/v3/maintenance/status", &json!({})).await else { continue };
        if status["leader"] == status["header"]["member_id"] {
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
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (stop, errors, last_claimed) = (stop.clone(), errors.clone(), last_claimed.clone());
            let (workload, target) = (workload.to_owned(), target.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let Ok(mut http) = Http::connect(&target).await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return latencies;
                };
                let value = base64(b"0123456789abcdef");
                let mut i: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let began = Instant::now();
                    let result = match workload.as_str() {
                        "append" => {
                            let key = base64(format!("bench/{run_id}/{t}/{i}").as_bytes());
                            http.post("/v3/kv/put", &json!({"key": key, "value": value})).await
                        }
                        "claim" => {
                            let id = claim_id(&last_claimed, t, i);
                            let key = base64(format!("claims/{run_id}-{id}").as_bytes());
                            let owner = base64(format!("t{t}").as_bytes());
                            let r = http
                                .post(
                                    "/v3/kv/txn",
                                    &json!({
                                        "compare": [{"key": key, "result": "EQUAL",
                                                     "target": "CREATE", "create_revision": "0"}],
                                        "success": [{"request_put": {"key": key, "value": owner}}],
                                        "failure": [{"request_range": {"key": key}}],
                                    }),
                                )
                                .await;
                            if r.as_ref().is_ok_and(|v| v["succeeded"] == true) {
                                last_claimed.store(id, Ordering::Relaxed);
                            }
                            r
                        }
                        _ => {
                            let key = base64(b"claims/hot");
                            http.post("/v3/kv/range", &json!({"key": key})).await
                        }
                    };
                    match result {
                        Ok(_) => latencies.push(began.elapsed().as_micros() as u64),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            match Http::connect(&target).await {
                                Ok(fresh) => http = fresh,
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
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
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
