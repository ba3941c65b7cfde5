//! How a WebSocket leaves actix-http's HTTP/1 dispatcher.
//!
//! A dispatcher keeps, for the life of its connection, two 8 KiB buffers and
//! a task of about 1.4 KiB: more than everything else an idle session costs.
//! For a WebSocket it is only a pipe. actix-http hands a request carrying
//! `Upgrade: websocket` to an *upgrade service* instead, with the connection
//! itself; this is that service. It runs the request through the same app
//! as every other request (routing, authentication, rate limits, access
//! log), writes the app's answer, and when the app accepted the upgrade (a
//! `101` carrying an [`Accept`]) hands the socket to the transport
//! ([`super::transport`]); the dispatcher then ends. Any other answer is
//! written and the connection closed.

use std::pin::Pin;
use std::rc::Rc;

use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::h1;
use actix_http::{ConnectionType, HttpMessage, Request, StatusCode};
use actix_web::dev::{Service, ServiceResponse};
use actix_web::rt::net::TcpStream;
use actix_web::web::BytesMut;
use actix_web::HttpResponse;

use super::transport::Connection;

/// Marks a request that came through this service: only such a request's
/// connection can be taken over.
#[derive(Clone, Copy)]
pub struct Upgradable;

/// Carried by a `101` answer: what to do with the connection once the answer
/// is written (start the session).
struct Accept(Box<dyn FnOnce(Connection)>);

/// The app's side: `response` (the handshake's `101`) accepts the upgrade,
/// and `start` is given the connection once it is written.
pub fn accept(
    mut response: HttpResponse,
    start: impl FnOnce(Connection) + 'static,
) -> HttpResponse {
    response.extensions_mut().insert(Accept(Box::new(start)));
    response
}

/// Serves one upgrade request with `app`.
pub async fn serve<S, B>(
    app: Rc<S>,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), actix_web::Error>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    req.extensions_mut().insert(Upgradable);
    let mut res: actix_http::Response<B> = match app.call(req).await {
        Ok(res) => res.into(),
        Err(e) => return refuse(framed, e.error_response().into()).await,
    };
    let accept = res.extensions_mut().remove::<Accept>();
    let accept = match accept {
        Some(accept) if res.status() == StatusCode::SWITCHING_PROTOCOLS => accept,
        _ => return refuse(framed, res.map_into_boxed_body()).await,
    };
    // Dropping the body now ends the access log's record of the request.
    let (head, _body) = res.into_parts();
    let written = write_head(&mut framed, head, BodySize::None).await;
    let parts = framed.into_parts();
    // The dispatcher's read buffer is let go; only what the peer already
    // sent past its request is kept.
    let read = if parts.read_buf.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&parts.read_buf[..])
    };
    // Started even if the answer could not be written: the session then
    // finds the connection gone and ends as for any other lost peer.
    (accept.0)(Connection { io: parts.io, read });
    if let Err(e) = written {
        // A client gone mid-handshake is no server error.
        log::debug!("upgrade answer not written: {e}");
    }
    Ok(())
}

async fn write_head(
    framed: &mut Framed<TcpStream, h1::Codec>,
    head: actix_http::Response<()>,
    size: BodySize,
) -> Result<(), actix_web::Error> {
    Pin::new(&mut *framed).write(h1::Message::Item((head, size)))?;
    flush(framed).await
}

async fn flush(framed: &mut Framed<TcpStream, h1::Codec>) -> Result<(), actix_web::Error> {
    futures_util::future::poll_fn(|cx| Pin::new(&mut *framed).flush(cx)).await?;
    Ok(())
}

/// Writes an answer that is not an upgrade, then closes the connection (the
/// dispatcher is gone, and an upgrade request has no keep-alive to resume).
/// Such answers are errors and small, so the body is written in one piece.
async fn refuse(
    mut framed: Framed<TcpStream, h1::Codec>,
    mut res: actix_http::Response<BoxBody>,
) -> Result<(), actix_web::Error> {
    res.head_mut().set_connection_type(ConnectionType::Close);
    let (head, body) = res.into_parts();
    let body = actix_http::body::to_bytes(body)
        .await
        .map_err(|e| actix_web::error::ErrorInternalServerError(e.to_string()))?;
    let size = BodySize::Sized(body.len() as u64);
    Pin::new(&mut framed).write(h1::Message::Item((head, size)))?;
    if !body.is_empty() {
        Pin::new(&mut framed).write(h1::Message::Chunk(Some(body)))?;
    }
    Pin::new(&mut framed).write(h1::Message::Chunk(None))?;
    flush(&mut framed).await?;
    // The client may have sent more (frames, a body) that nobody reads.
    // Boxed, so the state of every upgrade (and of the connection's task)
    // does not grow by it.
    Box::pin(super::transport::linger(&framed.into_parts().io)).await;
    Ok(())
}

/// Whether `req` came through [`serve`] (so its connection can be taken
/// over).
pub fn is_upgradable(req: &actix_web::HttpRequest) -> bool {
    req.extensions().get::<Upgradable>().is_some()
}
