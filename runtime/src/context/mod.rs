//! A bounded context as a node hosts it: its components, its read-model queries and its
//! sagas.

use std::sync::Arc;
use std::time::Duration;

use crate::component::DynComponent;

mod commands;
use crate::saga::DynSaga;
use crate::store::{StateError, StateRead};
pub use commands::NAME as COMMANDS;

/// A read-model query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The context serves no query of this name.
    #[error("unknown query {0:?}")]
    Unknown(String),
    /// The request is not JSON, or lacks what the query needs (the text says what).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// What the request names does not exist.
    #[error("not found")]
    NotFound,
    /// The state could not be read or a value not decoded (the store's error, as text).
    #[error("store: {0}")]
    Store(String),
}

impl From<crate::store::StoreError> for QueryError {
    fn from(e: crate::store::StoreError) -> Self {
        QueryError::Store(e.to_string())
    }
}

impl From<StateError> for QueryError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Tx(t) => QueryError::Store(t.to_string()),
            StateError::Corrupt(m) => QueryError::Store(m),
        }
    }
}

/// Reads one string field of a JSON query request.
pub fn request_field(req: &[u8], field: &str) -> Result<String, QueryError> {
    let v: serde_json::Value =
        serde_json::from_slice(req).map_err(|e| QueryError::BadRequest(e.to_string()))?;
    v.get(field)
        .and_then(|f| f.as_str())
        .map(str::to_string)
        .ok_or_else(|| QueryError::BadRequest(format!("missing string field {field:?}")))
}

/// One bounded context: its components, its sagas and its read-model queries. Most
/// contexts are assembled with [`ContextBuilder`] rather than by implementing this.
pub trait Context: Send + Sync + 'static {
    /// The context's name: its stream is `CHOREO_<NAME>`, its subjects `choreo.<name>.`.
    fn name(&self) -> &'static str;
    /// The components that handle its messages, sagas aside.
    fn components(&self) -> Vec<Arc<dyn DynComponent>>;
    /// Query names served on `choreo.<ctx>.query.<name>`.
    fn queries(&self) -> Vec<&'static str>;
    /// Process managers hosted by this context ([`crate::saga::hosted`]): the node handles
    /// their messages, fires their deadlines and serves their inspection.
    fn sagas(&self) -> Vec<Arc<dyn DynSaga>> {
        vec![]
    }
    /// The application's hooks on the messages it publishes
    /// ([`ContextBuilder::on_published`]).
    fn published_hooks(&self) -> Vec<crate::component::PublishedHook> {
        vec![]
    }
    /// The commands it sends to other contexts, by addressee ([`ContextBuilder::sends`]):
    /// its NATS rights let it publish those and no others (its own commands and events it
    /// may always publish). See `node::rights`.
    fn sends(&self) -> Vec<crate::component::Subscription> {
        vec![]
    }
    /// Answers a read-model query with a JSON value.
    fn query(
        &self,
        state: &dyn StateRead,
        name: &str,
        request: &[u8],
    ) -> Result<serde_json::Value, QueryError>;
}

impl dyn Context {
    /// Everything that handles the context's messages: its components and its sagas'.
    pub fn message_handlers(&self) -> Vec<Arc<dyn DynComponent>> {
        let mut all = self.components();
        all.extend(self.sagas().iter().map(|s| s.component()));
        all
    }
}

/// Default timeout of a request to another context's query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A read-model query: the request's JSON body against the context's state.
pub type QueryFn =
    Arc<dyn Fn(&dyn StateRead, &[u8]) -> Result<serde_json::Value, QueryError> + Send + Sync>;

/// One invariant's outcome: how many things it checked, and each violation found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    /// Things checked (e.g. SKUs, orders).
    pub checked: usize,
    /// Each violation, as a sentence naming what breaks the invariant.
    pub violations: Vec<String>,
}

/// The query answering a context's invariant `<name>` is named `invariant-<name>`
/// ([`ContextBuilder::invariant`]).
pub const INVARIANT_QUERY: &str = "invariant-";

/// Why a context cannot be assembled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    /// Two components or sagas (or one of them and the command router, [`COMMANDS`]) have
    /// the same name, which durable consumer names and inbox keys must not share.
    #[error("context {context}: two components or sagas are named {component}")]
    DuplicateComponent {
        /// The context being built.
        context: &'static str,
        /// The name given twice.
        component: &'static str,
    },
    /// Two queries have the same name.
    #[error("context {context}: two queries are named {query}")]
    DuplicateQuery {
        /// The context being built.
        context: &'static str,
        /// The name given twice.
        query: &'static str,
    },
    /// Its command handlers cannot share the context's command consumer: two of them
    /// declare the same command type, or one also subscribes to something else.
    #[error("context {context}: its command handlers cannot share its commands: {problem}")]
    Commands {
        /// The context being built.
        context: &'static str,
        /// Which handlers and which type or subscription, as text.
        problem: String,
    },
    /// A component subscribes to message types that name no context (declared with
    /// `message!(T, Kind)` and received through [`Subscription::of`](crate::Subscription::of)),
    /// so no stream to read them from is known.
    #[error(
        "context {context}: component {component} receives {types}, which name no context: \
         declare each with runtime::message!(T, Kind, \"<context>\")"
    )]
    NoSource {
        /// The context being built.
        context: &'static str,
        /// The component.
        component: &'static str,
        /// The types, separated by `, `.
        types: String,
    },
    /// A saga's declaration has problems: an edge to an undeclared state, a waiting state
    /// with neither a deadline nor a reason, a state nothing reaches or with no way out.
    #[error("context {context}: saga {saga} is declared wrongly: {problems}")]
    Saga {
        /// The context being built.
        context: &'static str,
        /// The saga's name.
        saga: &'static str,
        /// Every problem found, separated by `; `.
        problems: String,
    },
}

/// A context assembled from its parts: components, sagas and queries. A saga is registered
/// once: it handles its messages as a component and the node fires its deadlines and serves
/// its inspection. [`ContextBuilder::build`] checks the parts (unique names, each saga's
/// declared graph: every waiting state has a deadline or says why not, every state is
/// reached and has a way out).
///
/// ```
/// use runtime::context::ContextBuilder;
///
/// let ctx = ContextBuilder::new("notes")
///     .query("count", |state, _request| {
///         Ok(serde_json::json!(state.scan_prefix("note/")?.len()))
///     })
///     .build()
///     .unwrap();
/// assert_eq!(ctx.name(), "notes");
/// assert_eq!(ctx.queries(), ["count"]);
/// ```
pub struct ContextBuilder {
    name: &'static str,
    hooks: Vec<crate::component::PublishedHook>,
    components: Vec<Arc<dyn DynComponent>>,
    sagas: Vec<Arc<dyn DynSaga>>,
    queries: Vec<(&'static str, QueryFn)>,
    /// The queries [`ContextBuilder::aggregate`] adds: served at `build` unless `queries`
    /// has one of the same name.
    aggregate_queries: Vec<(&'static str, QueryFn)>,
    sends: Vec<crate::component::Subscription>,
}

impl ContextBuilder {
    /// A context named `name`: its stream is `CHOREO_<NAME>`, its subjects `choreo.<name>.`.
    pub fn new(name: &'static str) -> Self {
        ContextBuilder {
            name,
            hooks: Vec::new(),
            components: Vec::new(),
            sagas: Vec::new(),
            queries: Vec::new(),
            aggregate_queries: Vec::new(),
            sends: Vec::new(),
        }
    }

    /// The context's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Adds a component (a message handler).
    pub fn component(mut self, component: impl crate::component::Component) -> Self {
        self.components.push(Arc::new(component));
        self
    }

    /// Adds components given in their shared form.
    pub fn components(
        mut self,
        components: impl IntoIterator<Item = Arc<dyn DynComponent>>,
    ) -> Self {
        self.components.extend(components);
        self
    }

    /// Adds an aggregate: its commands (see [`crate::aggregate`]) and its state as the query
    /// named after it, unless the builder has or is given another query of that name.
    pub fn aggregate<A: crate::aggregate::Aggregate>(self) -> Self {
        let decider = crate::aggregate::Decider::<A>::new(self.name);
        let mut this = self.component(decider);
        this.aggregate_queries
            .push((A::NAME, Arc::new(aggregate_state::<A>)));
        this
    }

    /// Calls `hook` for each message of `types` the context publishes, once JetStream has
    /// stored it (not for a duplicate): where the application counts its own business
    /// metrics, such as the amounts its messages carry.
    pub fn on_published(
        mut self,
        types: &[&'static str],
        hook: impl Fn(&crate::component::Published<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.push(crate::component::PublishedHook {
            types: types.to_vec(),
            hook: Arc::new(hook),
        });
        self
    }

    /// Declares the commands of `types` it sends to context `addressee` (its components'
    /// and sagas' `Outgoing::command`s): a secured deployment grants it the right to publish
    /// those and no other context's commands (`choreo auth gen`, docs/security.md).
    pub fn sends(mut self, addressee: &'static str, types: &[&'static str]) -> Self {
        self.sends
            .push(crate::component::Subscription::commands(addressee, types));
        self
    }

    /// Adds a saga: its messages, its deadlines and its inspection.
    pub fn saga<P: crate::saga::ProcessManager>(mut self, saga: P) -> Self {
        self.sagas.push(crate::saga::hosted(saga));
        self
    }

    /// Serves the query `name` on `choreo.<context>.query.<name>`, instead of an
    /// aggregate's query of that name (a read model that answers with more than the
    /// instance); two such queries of one name are refused by [`ContextBuilder::build`].
    pub fn query(
        mut self,
        name: &'static str,
        answer: impl Fn(&dyn StateRead, &[u8]) -> Result<serde_json::Value, QueryError>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.queries.push((name, Arc::new(answer)));
        self
    }

    /// An invariant of this context's state named `name`: `check` reads the state and says
    /// what it checked and each violation. Served as the query `invariant-<name>`, which
    /// `choreo verify` asks of every running context (`runtime::client::invariants`). It
    /// reads key by key, not a snapshot: check once traffic has drained.
    pub fn invariant(
        self,
        name: &'static str,
        check: impl Fn(&dyn StateRead) -> Result<Check, QueryError> + Send + Sync + 'static,
    ) -> Self {
        // Leaked once per context built: query names are static.
        let query = Box::leak(format!("{INVARIANT_QUERY}{name}").into_boxed_str());
        self.query(query, move |state, _| {
            Ok(serde_json::to_value(check(state)?).unwrap_or_default())
        })
    }

    /// Serves each of `names` with one function that answers by name (a domain crate's
    /// `query(state, name, request)`).
    pub fn queries(
        mut self,
        names: &[&'static str],
        answer: fn(&dyn StateRead, &str, &[u8]) -> Result<serde_json::Value, QueryError>,
    ) -> Self {
        for &name in names {
            self = self.query(name, move |state, request| answer(state, name, request));
        }
        self
    }

    /// The context, once its parts check out. Several command handlers (two aggregates,
    /// say) share the context's command consumer as one component named [`COMMANDS`],
    /// which hands each command to the handler that declares its type.
    pub fn build(mut self) -> Result<Arc<dyn Context>, ContextError> {
        let context = self.name;
        for (name, answer) in std::mem::take(&mut self.aggregate_queries) {
            if self.queries.iter().all(|(q, _)| *q != name) {
                self.queries.push((name, answer));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        let names = self.components.iter().map(|c| c.name());
        for name in names.chain(self.sagas.iter().map(|s| s.name())) {
            if !seen.insert(name) {
                return Err(ContextError::DuplicateComponent {
                    context,
                    component: name,
                });
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (q, _) in &self.queries {
            if !seen.insert(*q) {
                return Err(ContextError::DuplicateQuery { context, query: q });
            }
        }
        for c in &self.components {
            let subs = c.subscriptions();
            let unknown: Vec<_> = subs.iter().filter(|s| s.source.is_empty()).collect();
            if !unknown.is_empty() {
                let types: Vec<&str> = unknown.iter().flat_map(|s| s.types.clone()).collect();
                return Err(ContextError::NoSource {
                    context,
                    component: c.name(),
                    types: types.join(", "),
                });
            }
        }
        for s in &self.sagas {
            let problems = s.problems();
            if !problems.is_empty() {
                return Err(ContextError::Saga {
                    context,
                    saga: s.name(),
                    problems: problems.join("; "),
                });
            }
        }
        let (handlers, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.components)
            .into_iter()
            .partition(|c| commands::handles_commands(&**c, context));
        self.components = others;
        if handlers.len() > 1 {
            let names = self.components.iter().map(|c| c.name());
            if let Some(component) = names
                .chain(self.sagas.iter().map(|s| s.name()))
                .find(|n| *n == COMMANDS)
            {
                return Err(ContextError::DuplicateComponent { context, component });
            }
            let router = commands::Commands::new(context, handlers)
                .map_err(|problem| ContextError::Commands { context, problem })?;
            self.components.insert(0, Arc::new(router));
        } else {
            self.components.splice(0..0, handlers);
        }
        Ok(Arc::new(Assembled(self)))
    }
}

/// Answers an aggregate's query: `{"<ID>": "..."}` gives the instance's state (its `Default`
/// if it has none yet).
fn aggregate_state<A: crate::aggregate::Aggregate>(
    state: &dyn StateRead,
    request: &[u8],
) -> Result<serde_json::Value, QueryError> {
    let id = request_field(request, A::ID)?;
    let found: A = crate::store::read(state, &crate::aggregate::key::<A>(&id))?.unwrap_or_default();
    serde_json::to_value(found).map_err(|e| QueryError::Store(e.to_string()))
}

/// A context built by [`ContextBuilder`].
struct Assembled(ContextBuilder);

impl Context for Assembled {
    fn name(&self) -> &'static str {
        self.0.name
    }
    fn components(&self) -> Vec<Arc<dyn DynComponent>> {
        self.0.components.clone()
    }
    fn queries(&self) -> Vec<&'static str> {
        self.0.queries.iter().map(|(q, _)| *q).collect()
    }
    fn published_hooks(&self) -> Vec<crate::component::PublishedHook> {
        self.0.hooks.clone()
    }
    fn sagas(&self) -> Vec<Arc<dyn DynSaga>> {
        self.0.sagas.clone()
    }
    fn sends(&self) -> Vec<crate::component::Subscription> {
        self.0.sends.clone()
    }
    fn query(
        &self,
        state: &dyn StateRead,
        name: &str,
        request: &[u8],
    ) -> Result<serde_json::Value, QueryError> {
        match self.0.queries.iter().find(|(q, _)| *q == name) {
            Some((_, answer)) => answer(state, request),
            None => Err(QueryError::Unknown(name.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;
