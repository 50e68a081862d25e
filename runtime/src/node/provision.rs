//! Everything a context's nodes use on JetStream: its stream and its sources' streams, the
//! dead-letter stream, with ownership the lease bucket, its changelog and its snapshot
//! bucket, and the durable consumer of each of its subscriptions.
//!
//! A node makes what is missing at start (it asks first, so what exists is only read). In
//! a locked-down deployment the operator makes it all before the nodes start
//! ([`provision`], `choreo provision`), and the contexts' rights hold no right to create
//! or change a stream or a durable consumer (`node::rights`, docs/security.md).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::ownership::patiently;
use super::NodeError;
use crate::config::NodeConfig;
use crate::context::Context;
use crate::pipeline::decide::durable_name;
use crate::wire::bus::Bus;
use crate::wire::changelog::{Changelog, Snapshots};
use crate::wire::lease::Leases;

/// The contexts whose streams `contexts` use: their own and their sources'.
pub fn streams_used(contexts: &[Arc<dyn Context>]) -> BTreeSet<&'static str> {
    let mut streams = BTreeSet::new();
    for c in contexts {
        streams.insert(c.name());
        for comp in c.message_handlers() {
            for s in comp.subscriptions() {
                streams.insert(s.source);
            }
        }
    }
    streams
}

/// Makes (or keeps) the dead-letter stream and the stream of every context `contexts` use;
/// returns those contexts.
pub(crate) async fn ensure_streams(
    bus: &Bus,
    cfg: &NodeConfig,
    contexts: &[Arc<dyn Context>],
) -> Result<BTreeSet<&'static str>, NodeError> {
    bus.ensure_dlq_stream(&cfg.stream_spec()).await?;
    let streams = streams_used(contexts);
    for s in &streams {
        bus.ensure_context_stream(s, &cfg.stream_spec()).await?;
    }
    Ok(streams)
}

/// Makes (or keeps) everything the nodes of `contexts` use, with `cfg`'s settings; returns
/// what it made or found, one line each.
pub async fn provision(
    bus: &Bus,
    cfg: &NodeConfig,
    contexts: &[Arc<dyn Context>],
) -> Result<Vec<String>, NodeError> {
    let mut done = vec!["stream (dead letters)".to_string()];
    for s in ensure_streams(bus, cfg, contexts).await? {
        done.push(format!("stream of {s}"));
    }
    // Patiently: a cluster just started may still be electing the leaders.
    if cfg.ownership.enabled {
        let (ttl, replicas) = (cfg.ownership.lease_ttl, cfg.stream.replicas);
        patiently("create the lease bucket", || {
            Leases::open(bus, ttl, replicas)
        })
        .await?;
        done.push("lease bucket".into());
        for c in contexts {
            let name = c.name();
            patiently("create a snapshot bucket", || {
                Snapshots::open(bus, name, replicas)
            })
            .await?;
            Changelog::open(bus, name, super::ownership::PARTITION, &cfg.stream_spec()).await?;
            done.push(format!("changelog and snapshot bucket of {name}"));
        }
    }
    for c in contexts {
        for comp in c.message_handlers() {
            for sub in comp.subscriptions() {
                let durable = durable_name(c.name(), comp.name(), &sub);
                let spec = cfg.consumer_spec(comp.name());
                patiently("create a durable consumer", || {
                    bus.durable_consumer(&durable, sub.source, sub.filter_subjects(), &spec)
                })
                .await?;
                done.push(format!("consumer {durable}"));
            }
        }
    }
    Ok(done)
}
