//! A bare gRPC unary caller on an HTTP/2 connection, for the load generator. tonic's client
//! hands a request body to a separate task, so its headers and its body leave in two
//! writes; with hundreds of requests in flight that doubles the load generator's syscalls
//! (and, on loopback, the server's wake-ups). Here both are queued on the connection before
//! it flushes, so a request usually leaves in one write. Only what `raftkv bench` needs:
//! unary calls, identity encoding, a status check.

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use tokio::net::TcpStream;

/// One HTTP/2 connection; clones share it (each call is a stream on it).
#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Bytes>,
    authority: String,
}

impl Conn {
    /// Connect to `url` (`http://host:port`).
    pub async fn connect(url: &str) -> Result<Conn, String> {
        let authority = url.trim_start_matches("http://").trim_end_matches('/');
        let tcp = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (send, conn) = h2::client::handshake(tcp)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            send,
            authority: authority.to_string(),
        })
    }

    /// Call `path` (e.g. `/etcdserverpb.KV/Put`) with `msg`; returns the response message's
    /// bytes, or the gRPC status message on failure.
    pub async fn unary(&mut self, path: &str, msg: &impl prost::Message) -> Result<Bytes, String> {
        self.unary_with(path, msg, &[]).await
    }

    /// [`Conn::unary`] with extra metadata (e.g. a session tag).
    pub async fn unary_with(
        &mut self,
        path: &str,
        msg: &impl prost::Message,
        metadata: &[(&str, String)],
    ) -> Result<Bytes, String> {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in metadata {
            req = req.header(*k, v);
        }
        let req = req.body(()).map_err(|e| e.to_string())?;
        let len = msg.encoded_len();
        let mut frame = BytesMut::with_capacity(5 + len);
        frame.put_u8(0); // not compressed
        frame.put_u32(u32::try_from(len).map_err(|_| "request too large")?);
        msg.encode(&mut frame).map_err(|e| e.to_string())?;

        let mut send = self.send.clone().ready().await.map_err(|e| e.to_string())?;
        let (response, mut body_tx) = send.send_request(req, false).map_err(|e| e.to_string())?;
        body_tx
            .send_data(frame.freeze(), true)
            .map_err(|e| e.to_string())?;
        let (parts, mut body) = response.await.map_err(|e| e.to_string())?.into_parts();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        // A failure may come "trailers-only", in the response headers.
        let trailers = body.trailers().await.map_err(|e| e.to_string())?;
        let headers = trailers.as_ref().unwrap_or(&parts.headers);
        let status = headers.get("grpc-status").and_then(|v| v.to_str().ok());
        if status != Some("0") {
            let message = headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return Err(format!("grpc-status {}: {message}", status.unwrap_or("?")));
        }
        if data.len() < 5 {
            return Err("a response without a message".into());
        }
        Ok(data.freeze().slice(5..))
    }
}
