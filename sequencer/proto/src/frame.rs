//! Versioned frames for every TCP connection (peer and client):
//!
//! ```text
//! magic "TOB1" (4) | version (1) | kind (1) | reserved (2) | cluster id (8) | length (4) | crc32 (4) | payload
//! ```
//!
//! The header is checked before a payload is read: a wrong magic, version or cluster id, or a
//! length over the bound, is refused without buffering it. The checksum covers the payload.

use crate::ErrorCode;

pub const MAGIC: [u8; 4] = *b"TOB1";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 24;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Raft messages between nodes.
    Peer = 1,
    /// A client's request.
    Request = 2,
    /// A node's response to a client.
    Response = 3,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<FrameKind> {
        match value {
            1 => Some(FrameKind::Peer),
            2 => Some(FrameKind::Request),
            3 => Some(FrameKind::Response),
            _ => None,
        }
    }
}

/// Why a frame was refused. Each closes the connection with this reason logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    BadMagic,
    UnsupportedVersion(u8),
    UnknownKind(u8),
    WrongCluster { expected: u64, got: u64 },
    TooLarge { length: usize, max: usize },
    Checksum,
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadMagic => write!(f, "not a tob frame (bad magic)"),
            FrameError::UnsupportedVersion(v) => {
                write!(f, "unsupported protocol version {v} (this node speaks {VERSION})")
            }
            FrameError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::WrongCluster { expected, got } => {
                write!(f, "frame for cluster {got:#x}, this is cluster {expected:#x}")
            }
            FrameError::TooLarge { length, max } => {
                write!(f, "frame of {length} bytes over the limit of {max}")
            }
            FrameError::Checksum => write!(f, "frame checksum mismatch"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub length: usize,
    crc: u32,
}

/// Encodes a frame.
pub fn encode(kind: FrameKind, cluster_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&cluster_id.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks a header before its payload is read.
pub fn decode_header(
    bytes: &[u8; HEADER_BYTES],
    cluster_id: u64,
    max_payload: usize,
) -> Result<Header, FrameError> {
    if bytes[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(FrameError::UnsupportedVersion(bytes[4]));
    }
    let kind = FrameKind::from_u8(bytes[5]).ok_or(FrameError::UnknownKind(bytes[5]))?;
    let got = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if got != cluster_id {
        return Err(FrameError::WrongCluster { expected: cluster_id, got });
    }
    let length = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize;
    if length > max_payload {
        return Err(FrameError::TooLarge { length, max: max_payload });
    }
    let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
    Ok(Header { kind, length, crc })
}

/// Checks a payload against its header.
pub fn check_payload(header: &Header, payload: &[u8]) -> Result<(), FrameError> {
    if payload.len() != header.length || crc32fast::hash(payload) != header.crc {
        return Err(FrameError::Checksum);
    }
    Ok(())
}

/// Decodes one whole frame from the front of `bytes`: `Ok(None)` if more bytes are needed,
/// otherwise the kind, the payload and how many bytes it used.
pub fn decode(
    bytes: &[u8],
    cluster_id: u64,
    max_payload: usize,
) -> Result<Option<(FrameKind, Vec<u8>, usize)>, FrameError> {
    let Some(header) = bytes.get(..HEADER_BYTES) else { return Ok(None) };
    let header = decode_header(header.try_into().expect("24 bytes"), cluster_id, max_payload)?;
    let end = HEADER_BYTES + header.length;
    let Some(payload) = bytes.get(HEADER_BYTES..end) else { return Ok(None) };
    check_payload(&header, payload)?;
    Ok(Some((header.kind, payload.to_vec(), end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: u64 = 0xC1;

    #[test]
    fn round_trips_and_waits_for_whole_frames() {
        let bytes = encode(FrameKind::Request, CLUSTER, b"hello");
        assert_eq!(decode(&bytes[..10], CLUSTER, 100), Ok(None));
        assert_eq!(decode(&bytes[..bytes.len() - 1], CLUSTER, 100), Ok(None));
        let (kind, payload, used) = decode(&bytes, CLUSTER, 100).unwrap().unwrap();
        assert_eq!(
            (kind, payload.as_slice(), used),
            (FrameKind::Request, &b"hello"[..], bytes.len())
        );
    }

    #[test]
    fn refuses_garbage_wrong_cluster_version_size_and_checksum() {
        let good = encode(FrameKind::Peer, CLUSTER, b"payload");
        assert_eq!(decode(&[b'x'; 40], CLUSTER, 100), Err(FrameError::BadMagic));
        assert!(matches!(decode(&good, 0xC2, 100), Err(FrameError::WrongCluster { .. })));
        let mut version = good.clone();
        version[4] = 9;
        assert_eq!(decode(&version, CLUSTER, 100), Err(FrameError::UnsupportedVersion(9)));
        let mut kind = good.clone();
        kind[5] = 77;
        assert_eq!(decode(&kind, CLUSTER, 100), Err(FrameError::UnknownKind(77)));
        assert!(matches!(
            decode(&good, CLUSTER, 3),
            Err(FrameError::TooLarge { length: 7, max: 3 })
        ));
        let mut flipped = good;
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(decode(&flipped, CLUSTER, 100), Err(FrameError::Checksum));
        assert_eq!(FrameError::TooLarge { length: 1, max: 0 }.code(), ErrorCode::TooLarge);
    }
}
