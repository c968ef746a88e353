//! The frame codec for TCP connections (see `tob_proto::frame`).

use bytes::{Buf, BytesMut};
use tob_proto::frame::{self, FrameError, FrameKind, HEADER_BYTES};
use tokio_util::codec::{Decoder, Encoder};

/// Why a connection's byte stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Decodes and encodes whole frames of one cluster.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    pub cluster_id: u64,
    pub max_payload: usize,
}

impl Decoder for FrameCodec {
    type Item = (FrameKind, Vec<u8>);
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        if src.len() < HEADER_BYTES {
            return Ok(None);
        }
        let header: &[u8; HEADER_BYTES] = src[..HEADER_BYTES].try_into().expect("length checked");
        // Checked before buffering the payload, so an oversized frame is refused at once.
        let header = frame::decode_header(header, self.cluster_id, self.max_payload)?;
        let end = HEADER_BYTES + header.length;
        if src.len() < end {
            src.reserve(end - src.len());
            return Ok(None);
        }
        let payload = src[HEADER_BYTES..end].to_vec();
        frame::check_payload(&header, &payload)?;
        src.advance(end);
        Ok(Some((header.kind, payload)))
    }
}

impl Encoder<(FrameKind, Vec<u8>)> for FrameCodec {
    type Error = CodecError;

    fn encode(
        &mut self,
        (kind, payload): (FrameKind, Vec<u8>),
        dst: &mut BytesMut,
    ) -> Result<(), CodecError> {
        dst.extend_from_slice(&frame::encode(kind, self.cluster_id, &payload));
        Ok(())
    }
}
