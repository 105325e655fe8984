//! Raw-bytes codec of `/waterfall/req/1.0.0`: a request or response is a one-byte tag
//! ([`TAG_DATA`]) followed by the payload up to the end of the stream, with a size limit.
//! The tag tells an empty payload from a stream the peer closed without answering (which libp2p
//! does when a response channel is dropped).
//!
//! Unlike the stock CBOR codec, an inbound request over the limit is not a read error (which
//! libp2p-request-response swallows without telling the behaviour) but an explicit
//! [`Body::Oversized`], so the actor learns who sent it and can penalise the sender.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{StreamProtocol, request_response};

/// A request or response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    Data(Vec<u8>),
    /// Inbound only: the peer sent more than the limit (the rest was not read).
    Oversized,
}

#[derive(Debug, Clone)]
pub(crate) struct BytesCodec {
    pub max_request: usize,
    pub max_response: usize,
}

/// Tag of a body carrying data (the only kind so far; others are refused).
const TAG_DATA: u8 = 0;

/// Read the tag and at most `max` payload bytes; `Oversized` if the stream holds more.
async fn read_limited<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Body> {
    let mut tag = [0u8; 1];
    io.read_exact(&mut tag).await?;
    if tag[0] != TAG_DATA {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unknown body tag",
        ));
    }
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    io.take(limit).read_to_end(&mut buf).await?;
    if buf.len() > max {
        Ok(Body::Oversized)
    } else {
        Ok(Body::Data(buf))
    }
}

async fn write_body<T: AsyncWrite + Unpin + Send>(io: &mut T, body: Body) -> io::Result<()> {
    match body {
        Body::Data(d) => {
            io.write_all(&[TAG_DATA]).await?;
            io.write_all(&d).await
        }
        Body::Oversized => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an oversized marker cannot be sent",
        )),
    }
}

impl request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Body;
    type Response = Body;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Body>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, self.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Body>
    where
        T: AsyncRead + Unpin + Send,
    {
        match read_limited(io, self.max_response).await? {
            Body::Oversized => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response exceeds the size limit",
            )),
            body => Ok(body),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Body,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_body(io, req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Body,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_body(io, res).await
    }
}
