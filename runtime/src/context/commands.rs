//! Several command handlers in one context, behind one consumer.
//!
//! Everything addressed to a context arrives on one durable consumer (`<ctx>.cmd.>`), so
//! that a command of a type nobody handles is dead-lettered rather than left in the stream.
//! When a context has several command handlers (two aggregates, say), [`Commands`] is that
//! consumer's component: it decodes each command with the handler that declares its type and
//! hands it over, so each handler sees only its own commands. A type declared by two
//! handlers is refused when the context is built.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::component::{
    downcast, Decision, DecodeError, DynComponent, ExternalCall, HandleCtx, HandleError, Kind,
    Subscription,
};
use crate::store::{StateRead, StateTx};

/// The name of the component that routes a context's commands to its handlers: part of
/// its durable consumer's name.
pub const NAME: &str = "commands";

/// A context's command handlers behind one consumer.
pub(crate) struct Commands {
    context: &'static str,
    handlers: Vec<Arc<dyn DynComponent>>,
    routes: BTreeMap<&'static str, usize>,
}

/// A command, decoded by the handler that will handle it.
struct Routed {
    handler: usize,
    input: Arc<dyn Any + Send + Sync>,
}

/// Whether `c` handles commands addressed to `context`.
pub(crate) fn handles_commands(c: &dyn DynComponent, context: &str) -> bool {
    c.subscriptions()
        .iter()
        .any(|s| s.kind == Kind::Command && s.source == context)
}

impl Commands {
    /// Routes the commands of `handlers`, which must subscribe to nothing but their
    /// context's commands, each type declared once. The error says which rule is broken.
    pub(crate) fn new(
        context: &'static str,
        handlers: Vec<Arc<dyn DynComponent>>,
    ) -> Result<Self, String> {
        let mut routes = BTreeMap::new();
        for (i, h) in handlers.iter().enumerate() {
            for s in h.subscriptions() {
                if s.kind != Kind::Command || s.source != context {
                    return Err(format!(
                        "{} handles commands and also subscribes to {} {}s: with several \
                         command handlers, each handles only commands",
                        h.name(),
                        s.source,
                        s.kind.token()
                    ));
                }
                for t in s.types {
                    if let Some(other) = routes.insert(t, i) {
                        return Err(format!(
                            "command {t} is handled by both {} and {}",
                            handlers[other].name(),
                            h.name()
                        ));
                    }
                }
            }
        }
        Ok(Commands {
            context,
            handlers,
            routes,
        })
    }

    fn route<'a>(
        &self,
        input: &'a (dyn Any + Send + Sync),
    ) -> Result<(&dyn DynComponent, &'a (dyn Any + Send + Sync)), HandleError> {
        let routed = downcast::<Routed>(input)?;
        Ok((&*self.handlers[routed.handler], &*routed.input))
    }
}

impl DynComponent for Commands {
    fn name(&self) -> &'static str {
        NAME
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        let types: Vec<&'static str> = self.routes.keys().copied().collect();
        vec![Subscription::commands(self.context, &types)]
    }
    fn external_systems(&self) -> Vec<&'static str> {
        let mut systems: Vec<_> = self
            .handlers
            .iter()
            .flat_map(|h| h.external_systems())
            .collect();
        systems.sort_unstable();
        systems.dedup();
        systems
    }
    fn decode(
        &self,
        msg_type: &str,
        payload: &[u8],
    ) -> Result<Arc<dyn Any + Send + Sync>, DecodeError> {
        let handler = *self
            .routes
            .get(msg_type)
            .ok_or_else(|| DecodeError::UnknownType(msg_type.to_string()))?;
        let input = self.handlers[handler].decode(msg_type, payload)?;
        Ok(Arc::new(Routed { handler, input }))
    }
    fn plan(
        &self,
        state: &dyn StateRead,
        input: &(dyn Any + Send + Sync),
    ) -> Result<Option<ExternalCall>, HandleError> {
        let (handler, input) = self.route(input)?;
        handler.plan(state, input)
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &(dyn Any + Send + Sync),
        ctx: &HandleCtx<'_>,
    ) -> Result<Decision, HandleError> {
        let (handler, input) = self.route(input)?;
        handler.handle(tx, input, ctx)
    }
}
