//! An HTTP send body (`PUT /v1/messages/{uuid}`): deserialised as actix's JSON extractor does,
//! then the body checks. A refused body is always a 4xx with the SPEC's error body.

#![no_main]

use courier::service::messaging::validate_body;
use courier::wire::SendRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<SendRequest>(data) else {
        return;
    };
    let copies = body.messages.len();
    match validate_body(body) {
        Ok(n) => {
            assert_eq!(n, copies);
            assert!(n <= 1_000);
        }
        Err(e) => {
            assert!(e.status().is_client_error(), "{e:?} is not a 4xx");
            let body = e.body();
            assert!(body["error"].is_string() && body["message"].is_string());
        }
    }
});
