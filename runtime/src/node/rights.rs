//! What each NATS identity may do, derived from what the code declares: a context's
//! consumers (their streams and durable names), the commands it sends
//! ([`crate::context::ContextBuilder::sends`]), its queries, sagas and external systems, its
//! changelog, lease keys and snapshot bucket. [`server_config`] writes them as a
//! nats-server `authorization` block (one nkey user per identity), which `choreo auth gen`
//! puts in a file the server includes.
//!
//! A context may publish its own events and commands, the commands it declares, its dead
//! letters, its changelog, its own lease keys and snapshots, requests to its external
//! systems, and the JetStream API calls for its own streams and its own durable consumers;
//! it may subscribe to its inbox prefix (`_INBOX_<ns>_<ctx>`), its queries, its sagas'
//! inspection, its fault-admin subject and its consumers' max-deliveries advisories. No
//! identity but the operator's may delete a stream or touch another context's consumer.
//! A context may purge its own stream and changelog (that is how acked history is trimmed;
//! NATS cannot tell a purge up to a sequence from a whole one). The operator creates the
//! streams, buckets and durable consumers before the nodes start (`node::provision`); in a
//! development set-up (`creates`) the nodes may create what they use themselves.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;

use crate::context::Context;
use crate::pipeline::decide::durable_name;
use crate::wire::identity::inbox_prefix;
use crate::wire::subjects;

/// The subjects an identity may publish and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rights {
    /// Subjects (with wildcards) it may publish to.
    pub publish: BTreeSet<String>,
    /// Subjects (with wildcards) it may subscribe to.
    pub subscribe: BTreeSet<String>,
    /// May answer requests it received on their reply subject (once, within a minute).
    pub responses: bool,
}

impl Rights {
    fn publish(&mut self, s: impl Into<String>) {
        self.publish.insert(s.into());
    }
    fn subscribe(&mut self, s: impl Into<String>) {
        self.subscribe.insert(s.into());
    }

    /// Adds every right of `other`.
    pub fn extend(&mut self, other: Rights) {
        self.publish.extend(other.publish);
        self.subscribe.extend(other.subscribe);
        self.responses |= other.responses;
    }

    /// JetStream API calls on stream `stream` itself, but never its deletion.
    fn stream_api(&mut self, stream: &str, ops: &[&str]) {
        for op in ops {
            self.publish(format!("$JS.API.STREAM.{op}.{stream}"));
        }
    }

    /// Everything on a stream only this identity uses (its changelog, its snapshot bucket),
    /// its deletion aside: reading, writing through its subjects, purging, any consumer;
    /// creating and changing it if `creates`.
    fn own_stream(&mut self, stream: &str, creates: bool) {
        self.stream_api(stream, &["INFO", "PURGE", "MSG.GET", "MSG.DELETE"]);
        if creates {
            self.stream_api(stream, &["CREATE", "UPDATE"]);
        }
        for api in [
            "CONSUMER.CREATE",
            "CONSUMER.DELETE",
            "CONSUMER.INFO",
            "CONSUMER.MSG.NEXT",
        ] {
            self.publish(format!("$JS.API.{api}.{stream}"));
            self.publish(format!("$JS.API.{api}.{stream}.>"));
        }
        for api in ["CONSUMER.LIST", "CONSUMER.NAMES", "DIRECT.GET"] {
            self.publish(format!("$JS.API.{api}.{stream}"));
        }
        self.publish(format!("$JS.API.DIRECT.GET.{stream}.>"));
        self.publish(format!("$JS.ACK.{stream}.>"));
        self.publish(format!("$JS.FC.{stream}.>"));
    }

    /// One durable consumer of this identity on `stream`: read, pull, ack, reset, and its
    /// max-deliveries advisory; create it if `creates`.
    fn durable(&mut self, stream: &str, durable: &str, creates: bool) {
        if creates {
            for api in ["CONSUMER.CREATE", "CONSUMER.DURABLE.CREATE"] {
                self.publish(format!("$JS.API.{api}.{stream}.{durable}"));
                self.publish(format!("$JS.API.{api}.{stream}.{durable}.>"));
            }
        }
        for api in ["CONSUMER.INFO", "CONSUMER.MSG.NEXT", "CONSUMER.RESET"] {
            self.publish(format!("$JS.API.{api}.{stream}.{durable}"));
        }
        self.publish(format!("$JS.ACK.{stream}.{durable}.>"));
        self.subscribe(format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"
        ));
    }
}

/// The rights of every node of `ctx` (all its instances share one identity). `creates`:
/// its nodes may also create the streams, buckets and durable consumers they use and change
/// their own stream (a development set-up); without it the operator makes them first
/// ([`super::provision::provision`]).
pub fn of_context(ctx: &dyn Context, creates: bool) -> Rights {
    let name = ctx.name();
    let ns = subjects::namespace();
    let mut r = Rights {
        responses: true,
        ..Rights::default()
    };
    r.publish(format!("{ns}.{name}.evt.>"));
    r.publish(format!("{ns}.{name}.cmd.>"));
    for sent in ctx.sends() {
        for t in &sent.types {
            r.publish(subjects::command(sent.source, t));
        }
    }
    r.publish(subjects::dead_letter(name));
    r.subscribe(format!("{}.>", inbox_prefix(ns, name)));
    r.subscribe(format!("{ns}.{name}.query.>"));
    r.subscribe(subjects::admin(name, ">"));
    for saga in ctx.sagas() {
        r.subscribe(subjects::saga(saga.name(), "*"));
    }
    // The query service's discovery ($SRV.PING, .INFO, .STATS, by name and id).
    r.subscribe("$SRV.>");
    // The account's JetStream limits (asked before a bucket is made).
    r.publish("$JS.API.INFO");

    // Its own stream: written through its subjects above; trimmed; consumers listed.
    let made = |r: &mut Rights, stream: &str, ops: &[&str]| {
        if creates {
            r.stream_api(stream, ops);
        }
    };
    let own = subjects::stream(name);
    r.stream_api(&own, &["INFO", "PURGE", "MSG.GET"]);
    made(&mut r, &own, &["CREATE", "UPDATE"]);
    r.publish(format!("$JS.API.CONSUMER.LIST.{own}"));
    r.publish(format!("$JS.API.CONSUMER.NAMES.{own}"));
    // Its durable consumers, on its own stream and its sources'.
    for comp in ctx.message_handlers() {
        for system in comp.external_systems() {
            r.publish(subjects::external(system, ">"));
        }
        for sub in comp.subscriptions() {
            let stream = subjects::stream(sub.source);
            r.stream_api(&stream, &["INFO", "MSG.GET"]);
            made(&mut r, &stream, &["CREATE"]);
            r.publish(format!("$JS.API.CONSUMER.LIST.{stream}"));
            r.publish(format!("$JS.API.CONSUMER.NAMES.{stream}"));
            r.durable(&stream, &durable_name(name, comp.name(), &sub), creates);
        }
    }
    // Dead letters: the stream is made by whichever node starts first.
    let dlq = subjects::dlq_stream();
    r.stream_api(&dlq, &["INFO"]);
    made(&mut r, &dlq, &["CREATE"]);
    r.publish(format!("$JS.API.CONSUMER.LIST.{dlq}"));
    r.publish(format!("$JS.API.CONSUMER.NAMES.{dlq}"));
    // Ownership: its changelog and snapshots are its own; the lease bucket is shared, but
    // it writes only its own keys.
    r.publish(format!("{ns}.changelog.{name}.>"));
    r.own_stream(&subjects::changelog_stream(name), creates);
    let snapshots = subjects::snapshot_bucket(name);
    r.publish(format!("$O.{snapshots}.>"));
    r.own_stream(&format!("OBJ_{snapshots}"), creates);
    let leases = subjects::lease_bucket();
    r.publish(format!("$KV.{leases}.{name}.>"));
    let kv = format!("KV_{leases}");
    r.stream_api(&kv, &["INFO", "MSG.GET"]);
    made(&mut r, &kv, &["CREATE"]);
    r.publish(format!("$JS.API.DIRECT.GET.{kv}"));
    r.publish(format!("$JS.API.DIRECT.GET.{kv}.>"));
    r.publish(format!("$JS.API.CONSUMER.CREATE.{kv}"));
    r.publish(format!("$JS.API.CONSUMER.CREATE.{kv}.>"));
    r.publish(format!("$JS.API.CONSUMER.MSG.NEXT.{kv}.>"));
    r.publish(format!("$JS.FC.{kv}.>"));
    r
}

/// The rights of a node hosting all of `contexts`: the union of theirs.
pub fn of_node(contexts: &[Arc<dyn Context>], creates: bool) -> Rights {
    let mut r = Rights::default();
    for c in contexts {
        r.extend(of_context(&**c, creates));
    }
    r
}

/// A client application's: send any context's commands, ask its queries, watch its events
/// (core NATS), read its replies on `_INBOX.`; no JetStream API, no admin subject.
pub fn client() -> Rights {
    let ns = subjects::namespace();
    let mut r = Rights::default();
    r.publish(format!("{ns}.*.cmd.>"));
    r.publish(format!("{ns}.*.query.>"));
    r.subscribe(format!("{ns}.*.evt.>"));
    r.subscribe("_INBOX.>");
    r
}

/// The external-system simulator's: answer requests to `systems`.
pub fn simulator(systems: &[&str]) -> Rights {
    let mut r = Rights {
        responses: true,
        ..Rights::default()
    };
    for s in systems {
        r.subscribe(subjects::external(s, ">"));
    }
    r.subscribe("_INBOX.>");
    r
}

/// The operator's (`choreo` commands, deployment): everything.
pub fn operator() -> Rights {
    let mut r = Rights::default();
    r.publish(">");
    r.subscribe(">");
    r
}

/// One identity in a server config: its public nkey, what it is, and its rights.
pub struct User {
    /// Its public nkey (`U...`).
    pub nkey: String,
    /// What it is, e.g. the context's node identity; written as a comment above it.
    pub name: String,
    /// What it may publish and subscribe to.
    pub rights: Rights,
}

/// A nats-server `authorization` block with one nkey user per identity.
pub fn server_config(users: &[User]) -> String {
    let list = |set: &BTreeSet<String>| {
        set.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from(
        "# Written by `choreo auth gen`: one nkey user per identity, rights derived from\n\
         # the code (see docs/security.md). Regenerate rather than edit.\n\
         authorization {\n  users = [\n",
    );
    for u in users {
        let _ = writeln!(out, "    # {}", u.name);
        let _ = writeln!(out, "    {{ nkey: {:?}, permissions: {{", u.nkey);
        let _ = writeln!(
            out,
            "      publish: {{ allow: [{}] }}",
            list(&u.rights.publish)
        );
        let _ = writeln!(
            out,
            "      subscribe: {{ allow: [{}] }}",
            list(&u.rights.subscribe)
        );
        if u.rights.responses {
            let _ = writeln!(out, "      allow_responses: {{ max: 1, expires: \"1m\" }}");
        }
        let _ = writeln!(out, "    }} }},");
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::Subscription;
    use crate::context::ContextBuilder;
    use crate::saga::testing::fixtures::Counter;

    fn payments() -> Arc<dyn Context> {
        use crate::component::{Component, DecodeError, HandleCtx, HandleError};
        use crate::store::StateTx;
        struct Billing;
        impl Component for Billing {
            type Input = ();
            fn name(&self) -> &'static str {
                "billing"
            }
            fn subscriptions(&self) -> Vec<Subscription> {
                vec![Subscription::events("orders", &["OrderPlaced"])]
            }
            fn external_systems(&self) -> Vec<&'static str> {
                vec!["gateway"]
            }
            fn decode(&self, _: &str, _: &[u8]) -> Result<(), DecodeError> {
                Ok(())
            }
            fn handle(
                &self,
                _: &dyn StateTx,
                _: &(),
                _: &HandleCtx<'_>,
            ) -> Result<Vec<crate::component::Outgoing>, HandleError> {
                Ok(vec![])
            }
        }
        ContextBuilder::new("payments")
            .component(Billing)
            .sends("shipping", &["ShipOrder"])
            .build()
            .unwrap()
    }

    #[test]
    fn a_context_may_publish_its_own_and_what_it_declares_only() {
        let r = of_context(&*payments(), false);
        for may in [
            "choreo.payments.evt.>",
            "choreo.payments.cmd.>",
            "choreo.shipping.cmd.ShipOrder",
            "choreo.dlq.payments",
            "choreo.changelog.payments.>",
            "choreo.ext.gateway.>",
            "$KV.CHOREO_LEASES.payments.>",
            "$JS.API.CONSUMER.MSG.NEXT.CHOREO_ORDERS.payments_billing_orders_evt",
            "$JS.ACK.CHOREO_ORDERS.payments_billing_orders_evt.>",
            "$JS.API.STREAM.PURGE.CHOREO_PAYMENTS",
        ] {
            assert!(r.publish.contains(may), "{may}");
        }
        let all = r
            .publish
            .iter()
            .chain(&r.subscribe)
            .cloned()
            .collect::<Vec<_>>();
        for never in [
            "choreo.orders.evt.>",
            "choreo.shipping.cmd.>",
            "$JS.API.STREAM.PURGE.CHOREO_ORDERS",
            "$JS.API.STREAM.DELETE.CHOREO_PAYMENTS",
            "choreo.>",
            ">",
            "_INBOX.>",
        ] {
            assert!(!all.iter().any(|s| s == never), "{never}");
        }
        assert!(!all.iter().any(|s| s.contains("STREAM.DELETE")));
        assert!(!all
            .iter()
            .any(|s| s.starts_with("$JS.API.CONSUMER.DELETE.CHOREO_ORDERS")));
        // The operator made its streams and durable consumers: it creates none.
        for never in [
            "STREAM.CREATE",
            "STREAM.UPDATE",
            "DURABLE.CREATE",
            "CREATE.CHOREO_ORDERS",
        ] {
            assert!(!all.iter().any(|s| s.contains(never)), "{never}");
        }
        let dev = of_context(&*payments(), true);
        for may in [
            "$JS.API.STREAM.CREATE.CHOREO_PAYMENTS",
            "$JS.API.STREAM.UPDATE.CHOREO_PAYMENTS",
            "$JS.API.STREAM.CREATE.CHOREO_ORDERS",
            "$JS.API.CONSUMER.CREATE.CHOREO_ORDERS.payments_billing_orders_evt",
        ] {
            assert!(dev.publish.contains(may), "{may}");
        }
        assert!(!dev.publish.contains("$JS.API.STREAM.UPDATE.CHOREO_ORDERS"));
        assert!(r.subscribe.contains("_INBOX_choreo_payments.>"));
        assert!(r.subscribe.contains("choreo.payments.query.>"));
        assert!(r.responses);
    }

    #[test]
    fn a_saga_s_inspection_is_its_host_s_to_serve() {
        let c = ContextBuilder::new("orders")
            .saga(Counter {
                name: "counter",
                ends: true,
                steps: false,
            })
            .build()
            .unwrap();
        let r = of_context(&*c, false);
        let saga = c.sagas()[0].name();
        assert!(r.subscribe.contains(&format!("choreo.saga.{saga}.*")));
    }

    #[test]
    fn the_server_config_lists_each_user_with_its_rights() {
        let text = server_config(&[
            User {
                nkey: "UA".into(),
                name: "payments".into(),
                rights: of_context(&*payments(), false),
            },
            User {
                nkey: "UB".into(),
                name: "operator".into(),
                rights: operator(),
            },
        ]);
        assert!(text.contains("{ nkey: \"UA\", permissions: {"));
        assert!(text.contains("publish: { allow: [\">\"] }"));
        assert_eq!(text.matches("allow_responses").count(), 1);
    }
}
