//! A bounded context as a node hosts it: its components, its read-model queries and its
//! sagas.

use std::sync::Arc;
use std::time::Duration;

use crate::component::DynComponent;
use crate::saga::DynSaga;
use crate::store::{StateError, StateRead};

/// A read-model query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("unknown query {0:?}")]
    Unknown(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
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

/// Why a context cannot be assembled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    #[error("context {context}: two components or sagas are named {component}")]
    DuplicateComponent {
        context: &'static str,
        component: &'static str,
    },
    #[error("context {context}: two queries are named {query}")]
    DuplicateQuery {
        context: &'static str,
        query: &'static str,
    },
    #[error("context {context}: saga {saga} is declared wrongly: {problems}")]
    Saga {
        context: &'static str,
        saga: &'static str,
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
    components: Vec<Arc<dyn DynComponent>>,
    sagas: Vec<Arc<dyn DynSaga>>,
    queries: Vec<(&'static str, QueryFn)>,
}

impl ContextBuilder {
    /// A context named `name`: its stream is `CHOREO_<NAME>`, its subjects `choreo.<name>.`.
    pub fn new(name: &'static str) -> Self {
        ContextBuilder {
            name,
            components: Vec::new(),
            sagas: Vec::new(),
            queries: Vec::new(),
        }
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

    /// Adds a saga: its messages, its deadlines and its inspection.
    pub fn saga<P: crate::saga::ProcessManager>(mut self, saga: P) -> Self {
        self.sagas.push(crate::saga::hosted(saga));
        self
    }

    /// Serves the query `name` on `choreo.<context>.query.<name>`.
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

    /// The context, once its parts check out.
    pub fn build(self) -> Result<Arc<dyn Context>, ContextError> {
        let context = self.name;
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
        for s in &self.sagas {
            let problems = s.definition().problems();
            if !problems.is_empty() {
                return Err(ContextError::Saga {
                    context,
                    saga: s.name(),
                    problems: problems.join("; "),
                });
            }
        }
        Ok(Arc::new(Assembled(self)))
    }
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
    fn sagas(&self) -> Vec<Arc<dyn DynSaga>> {
        self.0.sagas.clone()
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
mod tests {
    use super::*;
    use crate::saga::testing::fixtures::Counter;

    fn answer(_: &dyn StateRead, name: &str, _: &[u8]) -> Result<serde_json::Value, QueryError> {
        Ok(serde_json::json!(name))
    }

    #[test]
    fn queries_answer_by_name_and_unknown_ones_are_refused() {
        let ctx = ContextBuilder::new("notes")
            .queries(&["one", "two"], answer)
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ctx.query(&store, "two", b"{}").unwrap(), "two");
        assert!(matches!(
            ctx.query(&store, "three", b"{}"),
            Err(QueryError::Unknown(q)) if q == "three"
        ));
    }

    #[test]
    fn a_query_twice_is_refused() {
        let e = ContextBuilder::new("notes")
            .queries(&["one"], answer)
            .query("one", |_, _| Ok(serde_json::Value::Null))
            .build()
            .err();
        assert_eq!(
            e,
            Some(ContextError::DuplicateQuery {
                context: "notes",
                query: "one"
            })
        );
    }

    #[test]
    fn a_saga_is_hosted_once_and_its_graph_is_checked() {
        let ends = Counter {
            name: "counter",
            ends: true,
            steps: false,
        };
        let ctx = ContextBuilder::new("c").saga(ends).build().unwrap();
        assert_eq!(ctx.sagas().len(), 1);
        assert_eq!(ctx.components().len(), 0);
        assert_eq!(ctx.message_handlers()[0].name(), "counter");
        let twice = ContextBuilder::new("c")
            .saga(Counter {
                name: "counter",
                ends: true,
                steps: false,
            })
            .saga(Counter {
                name: "counter",
                ends: true,
                steps: false,
            })
            .build();
        assert!(matches!(
            twice,
            Err(ContextError::DuplicateComponent { .. })
        ));
        // Its only state waits forever: no deadline, and no reason given.
        let waits = ContextBuilder::new("c").saga(Counter {
            name: "counter",
            ends: false,
            steps: false,
        });
        match waits.build() {
            Err(ContextError::Saga { saga, problems, .. }) => {
                assert_eq!(saga, "counter");
                assert!(problems.contains("Counting"), "{problems}");
            }
            other => panic!("expected a saga problem, got {:?}", other.map(|c| c.name())),
        }
    }
}
