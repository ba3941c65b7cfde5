//! A WebSocket text frame as the device session reads it: `parse_client_frame`, then, for a
//! `send`, the body checks every send goes through. Whatever comes back must be something the
//! session can answer with: a 4xx `response` echoing the frame's id, or an `error` frame.

#![no_main]

use courier::domain::address::AccountId;
use courier::error::ApiError;
use courier::service::messaging::validate_body;
use courier::wire::{parse_client_frame, ClientFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;
use serde_json::{Number, Value};

fuzz_target!(|data: &[u8]| {
    // The session only ever sees UTF-8 here (actix refuses other text frames earlier).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_client_frame(text) {
        ClientFrame::Send {
            id,
            destination,
            body,
        } => {
            assert!(id.is_i64() || id.is_u64(), "send id {id}");
            let _ = destination.parse::<AccountId>();
            match validate_body(body) {
                Ok(copies) => assert!(copies <= 1_000),
                Err(e) => answered_with_4xx(&id, e),
            }
        }
        ClientFrame::InvalidSend { id, reason } => {
            assert!(id.is_i64() || id.is_u64(), "invalid-send id {id}");
            answered_with_4xx(&id, ApiError::BadRequest(reason));
        }
        ClientFrame::Ack { .. } => {}
        ClientFrame::Unusable(why) => {
            let frame: Value = serde_json::from_str(&ServerFrame::Error { message: why }.to_text())
                .expect("error frame is JSON");
            assert_eq!(frame["op"], "error");
            assert!(frame["message"].is_string());
        }
    }
});

/// The `response` frame the session would send: a 4xx with the SPEC's error body, and the
/// frame's id echoed exactly as given.
fn answered_with_4xx(id: &Number, e: ApiError) {
    assert!(e.status().is_client_error(), "{e:?} is not a 4xx");
    let text = ServerFrame::Response {
        id,
        status: e.status().as_u16(),
        body: e.body(),
    }
    .to_text();
    let frame: Value = serde_json::from_str(&text).expect("response frame is JSON");
    assert_eq!(frame["op"], "response");
    assert_eq!(frame["id"].as_number(), Some(id), "id not echoed: {text}");
    assert!(frame["body"]["error"].is_string() && frame["body"]["message"].is_string());
}
