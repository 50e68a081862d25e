//! The config's defaults, validation and TOML overrides.

use super::*;

const KNOWN: &[&str] = &["orders", "payments"];

fn valid() -> NodeConfig {
    NodeConfig {
        contexts: vec!["orders".into()],
        ..NodeConfig::default()
    }
}

#[test]
fn defaults_are_valid() {
    valid().validate(KNOWN).unwrap();
}

/// Why `c` is refused (it must be).
fn refusal(c: &NodeConfig) -> String {
    c.validate(KNOWN).unwrap_err().to_string()
}

#[test]
fn rejects_what_would_misbehave() {
    let mut c = valid();
    c.contexts = vec!["shop".into()];
    assert!(refusal(&c).contains("unknown context"));
    let mut c = valid();
    c.consumer.ack_wait = Duration::from_secs(1);
    assert!(refusal(&c).contains("3x"));
    let mut c = valid();
    c.store.flush_stall = Duration::from_millis(500);
    assert!(refusal(&c).contains("store.flush_stall must be at least 1s"));
    let mut c = valid();
    c.max_message_bytes = 2 << 20;
    assert!(c.validate(KNOWN).is_err());
    let mut c = valid();
    c.metrics_addr = "nowhere".into();
    assert!(c.validate(KNOWN).is_err());
    let mut c = valid();
    c.stream.replicas = 2;
    assert!(refusal(&c).contains("stream.replicas must be 1, 3 or 5"));
    let mut c = valid();
    c.ownership.lease_ttl = Duration::from_millis(500);
    assert!(refusal(&c).contains("ownership.lease_ttl must be at least 1s"));
    let mut c = valid();
    (c.ownership.enabled, c.ownership.local_sync) = (false, false);
    assert!(refusal(&c).contains("local_sync = false needs ownership.enabled"));
}

#[test]
fn toml_overrides_and_unknown_keys() {
    let c: NodeConfig = toml::from_str("contexts=['orders']\n[consumer]\nmax_deliver=5\n").unwrap();
    assert_eq!(c.consumer.max_deliver, 5);
    assert_eq!(c.consumer.ack_wait, Duration::from_secs(30));
    assert!(toml::from_str::<NodeConfig>("bogus = 1").is_err());
}

#[test]
fn handler_policies_override_the_default() {
    let c: NodeConfig = toml::from_str(
        "contexts=['orders']\n[retry]\nbudget=4\n[handlers.billing]\nmax_in_flight=8\n[handlers.billing.retry]\nbudget=2\n",
    )
    .unwrap();
    c.validate(KNOWN).unwrap();
    assert_eq!(
        (c.policy("billing").budget, c.policy("stock").budget),
        (2, 4)
    );
    assert_eq!(
        (c.max_in_flight("billing"), c.max_in_flight("stock")),
        (8, 64)
    );
    let mut bad = c.clone();
    bad.retry.handler_timeout = bad.consumer.ack_wait;
    assert!(bad
        .validate(KNOWN)
        .unwrap_err()
        .to_string()
        .contains("handler_timeout"));
}
