//! JSON bodies and WebSocket frames exactly as the SPEC spells them
//! (camelCase, binary values in standard base64). Parsing only: the rules
//! live in `domain/` and `service/`.
//!
//! The HTTP bodies derive `ToSchema` for `GET /v1/openapi.json`. Their
//! `#[schema(...)]` bounds restate the rules of `domain/` (utoipa takes only
//! literals there); `tests/openapi.rs` checks them against the constants.
//!
//! - [`bodies`]: HTTP request and response bodies (and the envelope as JSON).
//! - [`frames`]: WebSocket frames, client and server.

mod bodies;
mod frames;

pub use bodies::*;
pub use frames::*;

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::domain::envelope::Envelope;

    #[test]
    fn message_frame_is_the_serde_form() {
        let e = Envelope {
            guid: crate::domain::envelope::new_guid(),
            source: Some(crate::domain::address::Address {
                account: crate::domain::address::AccountId::random(),
                device: crate::domain::address::DeviceId(7),
            }),
            msg_type: 3,
            timestamp: -1,
            server_timestamp: 1_700_000_000_000,
            content: (0..=255u8).collect::<Vec<u8>>().into(),
            slot: Default::default(),
        };
        let direct: Value = serde_json::from_str(&message_frame(&e)).unwrap();
        let serde: Value = serde_json::from_str(
            &ServerFrame::Message {
                envelope: (&e).into(),
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(direct, serde);
        let empty = Envelope {
            content: Vec::new().into(),
            slot: Default::default(),
            ..e
        };
        let direct: Value = serde_json::from_str(&message_frame(&empty)).unwrap();
        assert_eq!(direct["envelope"]["content"], "");
        // A sealed-sender copy names no sender, in either form.
        let sealed = Envelope {
            source: None,
            msg_type: 6,
            ..empty
        };
        let direct: Value = serde_json::from_str(&message_frame(&sealed)).unwrap();
        let serde: Value = serde_json::from_str(
            &ServerFrame::Message {
                envelope: (&sealed).into(),
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(direct, serde);
        assert!(direct["envelope"].get("source").is_none());
        assert!(direct["envelope"].get("sourceDevice").is_none());
        // A multi-recipient copy: its prefix and the shared payload, joined.
        let shared = Envelope {
            content: crate::domain::envelope::Content::Shared {
                prefix: vec![0x22, 1, 2],
                shared: std::sync::Arc::new(crate::domain::envelope::SharedPayload {
                    id: uuid::Uuid::nil(),
                    bytes: vec![3, 4, 5, 6],
                }),
            },
            ..sealed
        };
        let direct: Value = serde_json::from_str(&message_frame(&shared)).unwrap();
        assert_eq!(direct["envelope"]["content"], "IgECAwQFBg==");
    }

    #[test]
    fn response_frame_is_the_serde_form() {
        let id = serde_json::Number::from(42u64);
        let body = serde_json::json!({"results": [{"deviceId": 1, "status": "delivered"}]});
        let direct: Value = serde_json::from_str(&response_frame(&id, 200, &body)).unwrap();
        let serde: Value = serde_json::from_str(
            &ServerFrame::Response {
                id: &id,
                status: 200,
                body: body.clone(),
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(direct, serde);
    }

    #[test]
    fn send_response_frame_is_the_serde_form() {
        for id in [
            serde_json::Number::from(7u64),
            serde_json::Number::from(-1i64),
        ] {
            for results in [0usize, 1, 3] {
                let r = SendResponse {
                    results: (0..results)
                        .map(|i| SendResult {
                            device_id: i as u32 + 1,
                            guid: crate::domain::envelope::new_guid(),
                            status: [
                                DeliveryStatus::Delivered,
                                DeliveryStatus::Queued,
                                DeliveryStatus::Dropped,
                            ][i % 3],
                        })
                        .collect(),
                };
                let direct: Value = serde_json::from_str(&send_response_frame(&id, &r)).unwrap();
                let serde: Value = serde_json::from_str(&response_frame(&id, 200, &r)).unwrap();
                assert_eq!(direct, serde);
            }
        }
    }

    #[test]
    fn classifies_frames() {
        let send = r#"{"op":"send","id":7,"destination":"x","timestamp":1,"messages":[]}"#;
        assert!(matches!(parse_client_frame(send), ClientFrame::Send { .. }));
        let bad_body = r#"{"op":"send","id":7,"destination":"x"}"#;
        assert!(matches!(
            parse_client_frame(bad_body),
            ClientFrame::InvalidSend { .. }
        ));
        let ack = r#"{"op":"ack","guid":"01a20be5-4993-7263-9937-da3d464f9b8c"}"#;
        assert!(matches!(parse_client_frame(ack), ClientFrame::Ack { .. }));
        for unusable in [
            "",
            "not json",
            "[]",
            "7",
            r#"{"op":5}"#,
            r#"{"op":"send","id":"7"}"#,
            r#"{"op":"send","id":1.5}"#,
            r#"{"op":"send"}"#,
            r#"{"op":"ack","guid":"nope"}"#,
            r#"{"op":"dance"}"#,
            r#"{}"#,
        ] {
            assert!(
                matches!(parse_client_frame(unusable), ClientFrame::Unusable(_)),
                "{unusable:?}"
            );
        }
    }

    #[test]
    fn one_pass_reads_every_frame_as_two_passes_do() {
        let frames = [
            r#"{"op":"send","id":7,"destination":"x","timestamp":1,"messages":[]}"#,
            r#"{"op":"send","id":7,"destination":"a\u0062c","timestamp":1,"online":true,"messages":[{"destinationDeviceId":1,"destinationRegistrationId":2,"type":1,"content":"aGk="}]}"#,
            r#"{"op":"send","id":7,"destination":"x","timestamp":1,"messages":[],"unidentifiedAccessKey":"AAAA"}"#,
            r#"{"op":"send","id":7,"destination":"x","timestamp":1,"messages":[],"guid":5}"#,
            r#"{"op":"send","id":7,"destination":"x","timestamp":1,"messages":[],"extra":{"a":[1]}}"#,
            r#"{"op":"send","id":7,"destination":null,"timestamp":1,"messages":[]}"#,
            r#"{"op":"send","id":7,"destination":"x","timestamp":"1","messages":[]}"#,
            r#"{"op":"send","id":7,"destination":"x","timestamp":1}"#,
            r#"{"op":"send","id":7,"destination":"x","timestamp":1,"messages":[],"online":null}"#,
            r#"{"op":"send","id":1.5,"destination":"x","timestamp":1,"messages":[]}"#,
            r#"{"op":"send","id":-3,"destination":"x","timestamp":1,"messages":[]}"#,
            r#"{"op":"send","destination":"x","timestamp":1,"messages":[]}"#,
            r#"{"op":"send","id":7,"id":8,"destination":"x","timestamp":1,"messages":[]}"#,
            r#"{"op":"ack","guid":"01a20be5-4993-7263-9937-da3d464f9b8c"}"#,
            r#"{"op":"ack","guid":"01a20be5-4993-7263-9937-da3d464f9b8\u0063"}"#,
            r#"{"op":"ack","guid":"01a20be5-4993-7263-9937-da3d464f9b8c","messages":5}"#,
            r#"{"op":"ack","guid":7}"#,
            r#"{"op":"ack"}"#,
            r#"{"op":"a\u0063k","guid":"01a20be5-4993-7263-9937-da3d464f9b8c"}"#,
            r#"{"op":"dance","id":1}"#,
            r#"{"op":5}"#,
            r#"{}"#,
            "[]",
            "",
        ];
        for frame in frames {
            assert_eq!(
                format!("{:?}", parse_client_frame(frame)),
                format!("{:?}", parse_client_frame_in_two(frame)),
                "{frame}"
            );
        }
    }

    #[test]
    fn ids_are_echoed_as_given() {
        let big = r#"{"op":"send","id":18446744073709551615,"destination":"x"}"#;
        match parse_client_frame(big) {
            ClientFrame::InvalidSend { id, .. } => {
                assert_eq!(id.to_string(), "18446744073709551615")
            }
            other => panic!("{other:?}"),
        }
    }
}
