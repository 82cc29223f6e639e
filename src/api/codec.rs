//! The protobuf codec of every generated client and server: prost's, except
//! that a message that does not decode (a string field that is not UTF-8, a
//! truncated field) is the sender's fault and answers `INVALID_ARGUMENT`
//! with prost's description, which names the message and field
//! (`GenerateRequest.prompt: invalid string value: data is not UTF-8
//! encoded`). prost's own codec calls it `INTERNAL`, which tells a client
//! to retry something that can never succeed.
//!
//! It knows nothing of the messages it carries.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// Codec named by `build.rs` (`codec_path`) for all generated services.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _type: PhantomData }
    }
}

/// Decodes `U`; a malformed message is `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed message: {e}")))
    }
}
