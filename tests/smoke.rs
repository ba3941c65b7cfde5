mod common;

use common::*;
use reqwest::{Method, StatusCode};

async fn register_and_list(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = TestDevice::register(&server).await;
    let (status, body) = alice.request(Method::GET, "/v1/devices", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body[0]["deviceId"], 1);
}

backends!(register_and_list);
