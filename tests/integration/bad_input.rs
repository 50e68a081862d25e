//! Bad input on a subject is dead-lettered with its reason and terminated; the node keeps
//! running and keeps processing good messages. One test per case.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use runtime::wire::envelope::{headers, new_id, now_ms};
use runtime::{wire::subjects, Envelope};

use crate::harness::{self, eventually, TestShop};

async fn inventory() -> TestShop {
    harness::start(&["inventory"], false, "").await
}

/// Publishes raw bytes (headers optional) and returns the marker it carries.
async fn publish_raw(t: &TestShop, subject: &str, headers: Option<HeaderMap>, payload: Vec<u8>) {
    let ack = match headers {
        Some(h) => {
            t.bus
                .js
                .publish_with_headers(subject.to_string(), h, payload.into())
                .await
        }
        None => t.bus.js.publish(subject.to_string(), payload.into()).await,
    };
    ack.expect("publish").await.expect("stored");
}

fn valid_headers(msg_type: &str) -> HeaderMap {
    Envelope::first(new_id(), msg_type, "test", now_ms()).to_headers()
}

/// The dead letter whose payload contains `marker`; returns its reason.
async fn reason_for(t: &TestShop, marker: &str) -> String {
    let m = marker.to_string();
    harness::wait_dead_letter(&t.bus, move |_, p: &Bytes| {
        String::from_utf8_lossy(p).contains(&m)
    })
    .await
}

/// The node is alive and still applies a valid command.
async fn still_serving(t: &mut TestShop) {
    assert!(t.shop.dead_node().is_none(), "node still running");
    let sku = format!("alive-{}", new_id());
    let env = Envelope::first(new_id(), "AddStock", "test", now_ms());
    let body = Bytes::from(serde_json::json!({ "sku": sku, "qty": 2 }).to_string());
    t.bus
        .publish(&subjects::command("inventory", "AddStock"), &env, body)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            harness::sku(&t.bus, &sku).await.0 == 2
        })
        .await
    );
    let addr = t.shop.node("inventory").unwrap().metrics_addr.clone();
    assert!(
        harness::metric(&addr, "choreo_dead_letters_total", &[]) >= 1.0,
        "dead letter counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_dead_lettered() {
    let mut t = inventory().await;
    let marker = "marker-malformed";
    let payload = format!("{{\"sku\": \"{marker}\", \"qty\": ").into_bytes();
    publish_raw(
        &t,
        &subjects::command("inventory", "AddStock"),
        Some(valid_headers("AddStock")),
        payload,
    )
    .await;
    let reason = reason_for(&t, marker).await;
    assert!(
        reason.contains("malformed AddStock payload"),
        "reason: {reason}"
    );
    still_serving(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_payload_shape_is_dead_lettered() {
    let mut t = inventory().await;
    let marker = "marker-shape";
    let payload = serde_json::json!({ "sku": marker, "qty": "lots" })
        .to_string()
        .into_bytes();
    publish_raw(
        &t,
        &subjects::command("inventory", "AddStock"),
        Some(valid_headers("AddStock")),
        payload,
    )
    .await;
    let reason = reason_for(&t, marker).await;
    assert!(
        reason.contains("malformed AddStock payload: invalid type"),
        "reason: {reason}"
    );
    still_serving(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_type_is_dead_lettered() {
    let mut t = inventory().await;
    let marker = "marker-unknown";
    let payload = serde_json::json!({ "note": marker })
        .to_string()
        .into_bytes();
    publish_raw(
        &t,
        &subjects::command("inventory", "Teleport"),
        Some(valid_headers("Teleport")),
        payload,
    )
    .await;
    let reason = reason_for(&t, marker).await;
    assert!(
        reason.contains("unknown message type \"Teleport\""),
        "reason: {reason}"
    );
    still_serving(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_headers_are_dead_lettered() {
    let mut t = inventory().await;
    // No headers at all.
    publish_raw(
        &t,
        &subjects::command("inventory", "AddStock"),
        None,
        b"{\"sku\":\"marker-noheaders\",\"qty\":1}".to_vec(),
    )
    .await;
    let reason = reason_for(&t, "marker-noheaders").await;
    assert!(reason.contains("no headers"), "reason: {reason}");
    // Headers without the message id.
    let mut h = HeaderMap::new();
    for (k, v) in valid_headers("AddStock").iter() {
        let k: &str = k.as_ref();
        if k != headers::ID {
            h.insert(k, v[0].as_str());
        }
    }
    publish_raw(
        &t,
        &subjects::command("inventory", "AddStock"),
        Some(h),
        b"{\"sku\":\"marker-noid\",\"qty\":1}".to_vec(),
    )
    .await;
    let reason = reason_for(&t, "marker-noid").await;
    assert!(
        reason.contains("missing header Choreo-Id"),
        "reason: {reason}"
    );
    assert_eq!(
        harness::sku(&t.bus, "marker-noid").await.0,
        0,
        "not applied"
    );
    still_serving(&mut t).await;
}

/// The size limit counts the payload and the headers' names and values, exactly: a message
/// of 65,536 bytes that way is handled, one of 65,537 is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_limit_counts_payload_and_headers_exactly() {
    let t = inventory().await;
    let sized = |sku: &str, size: usize| {
        let headers = valid_headers("AddStock");
        let header_bytes = runtime::wire::envelope::message_size(Some(&headers), b"");
        let head = format!("{{\"sku\":\"{sku}\",\"qty\":1,\"pad\":\"");
        let pad = size - header_bytes - head.len() - 2;
        let mut payload = head.into_bytes();
        payload.extend(std::iter::repeat_n(b'x', pad));
        payload.extend(b"\"}");
        assert_eq!(header_bytes + payload.len(), size);
        (headers, payload)
    };
    let (headers, payload) = sized("marker-limit", 65_536);
    publish_raw(
        &t,
        &subjects::command("inventory", "AddStock"),
        Some(headers),
        payload,
    )
    .await;
    let (headers, payload) = sized("marker-over", 65_537);
    let original_id = headers
        .get(headers::NATS_MSG_ID)
        .unwrap()
        .as_str()
        .to_string();
    publish_raw(
        &t,
        &subjects::command("inventory", "AddStock"),
        Some(headers),
        payload,
    )
    .await;
    let reason = reason_for(&t, "marker-over").await;
    assert!(
        reason.contains("65537 bytes > limit 65536"),
        "reason: {reason}"
    );
    // The dead letter keeps the original headers; its own Nats-Msg-Id is new, the
    // original one is kept beside it.
    let (dead, _) = harness::dead_letters(&t.bus)
        .await
        .into_iter()
        .find(|(_, p)| String::from_utf8_lossy(p).contains("marker-over"))
        .unwrap();
    assert_eq!(dead.get(headers::ID).unwrap().as_str(), original_id);
    assert_eq!(dead.get(headers::DLQ_MSG_ID).unwrap().as_str(), original_id);
    assert_ne!(
        dead.get(headers::NATS_MSG_ID).unwrap().as_str(),
        original_id
    );
    let applied = harness::eventually(Duration::from_secs(10), || async {
        harness::sku(&t.bus, "marker-limit").await.0 == 1
    })
    .await;
    assert!(applied, "a message at the limit is handled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_dead_lettered() {
    let mut t = inventory().await;
    let mut payload = b"{\"sku\":\"marker-big\",\"qty\":1,\"pad\":\"".to_vec();
    payload.extend(std::iter::repeat_n(b'x', 100 * 1024));
    payload.extend(b"\"}");
    publish_raw(
        &t,
        &subjects::command("inventory", "AddStock"),
        Some(valid_headers("AddStock")),
        payload,
    )
    .await;
    let reason = reason_for(&t, "marker-big").await;
    assert!(
        reason.contains("oversized") && reason.contains("65536"),
        "reason: {reason}"
    );
    assert_eq!(harness::sku(&t.bus, "marker-big").await.0, 0, "not applied");
    still_serving(&mut t).await;
}
