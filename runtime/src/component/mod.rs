//! What a bounded context gives the runtime: components that handle messages, and queries.
//!
//! A component is a set of subscriptions plus three pure-ish steps the runtime drives:
//! `decode` (bytes to a typed input), `plan` (which external call, if any, to make before
//! the transaction; reads state, never writes) and `handle` (inside the transaction: read
//! and write state, return the messages to send). `handle` may run more than once on a
//! conflict, so it must be deterministic: time and external replies come in as data.
//!
//! [`testing::Harness`] drives a component given/when/then on a real store, without NATS.

use std::any::Any;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::{StateError, StateRead, StateTx};
use crate::telemetry::saga_counts::SagaMove;
use crate::wire::envelope::Envelope;
use crate::wire::subjects;

pub mod testing;

pub use crate::wire::external::ExternalCall;

/// Events are facts a context publishes on its own prefix; commands are addressed to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A fact a context publishes on its own prefix (`<ns>.<ctx>.evt.<Type>`).
    Event,
    /// A request addressed to one context, on its prefix (`<ns>.<ctx>.cmd.<Type>`).
    Command,
}

impl Kind {
    /// The kind's token in a subject and a durable consumer's name: `evt` or `cmd`.
    pub(crate) fn token(self) -> &'static str {
        match self {
            Kind::Event => "evt",
            Kind::Command => "cmd",
        }
    }
}

/// A typed message with a fixed type name (the last token of its subject).
pub trait Message: Serialize + DeserializeOwned {
    /// The wire type name: the last token of the message's subject and the envelope's type.
    const TYPE: &'static str;
    /// Whether it is an event or a command.
    const KIND: Kind;
    /// The context it belongs to (the publisher of an event, the addressee of a command),
    /// if declared: sagas subscribe to a message by it, [`Outgoing::message`] addresses
    /// a command to it. Empty when not declared.
    const CONTEXT: &'static str = "";
}

/// Implements [`Message`] for a struct, with its type name as the wire type and,
/// optionally, the context it belongs to:
/// `runtime::message!(OrderPlaced, Event, "orders");`
#[macro_export]
macro_rules! message {
    ($name:ident, $kind:ident) => {
        impl $crate::component::Message for $name {
            const TYPE: &'static str = stringify!($name);
            const KIND: $crate::component::Kind = $crate::component::Kind::$kind;
        }
    };
    ($name:ident, $kind:ident, $context:expr) => {
        impl $crate::component::Message for $name {
            const TYPE: &'static str = stringify!($name);
            const KIND: $crate::component::Kind = $crate::component::Kind::$kind;
            const CONTEXT: &'static str = $context;
        }
    };
}

/// A closed set of message types as one enum: decoded by type name without a hand-written
/// table, and sent as what each variant is. Made by [`messages!`](crate::messages).
pub trait Messages: Sized + Send + Sync + 'static {
    /// The wire type names, in declaration order.
    const TYPES: &'static [&'static str];
    /// Each type's context ([`Message::CONTEXT`]: the publisher of an event, the addressee
    /// of a command) and kind, in the order of [`Messages::TYPES`].
    const ROUTES: &'static [(&'static str, Kind)];
    /// The variant for `msg_type`, decoded from `payload`.
    fn decode(msg_type: &str, payload: &[u8]) -> Result<Self, DecodeError>;
    /// The message to send (see [`Outgoing::message`]).
    fn outgoing(&self) -> Outgoing;
}

/// Declares an enum with one variant per message type (each variant named after its type
/// and holding it), implements [`Messages`] for it and `From` each type. Two forms:
///
/// - `enum E { A, B }` for types declared elsewhere with [`message!`](crate::message);
/// - `enum E: Kind in CONTEXT { A { field: Type, .. }, .. }` also declares each type, as a
///   struct (its fields with the enum's visibility) deriving `Debug`, `Clone`, `PartialEq` and serde's
///   `Serialize` and `Deserialize` (the crate must depend on `serde` with `derive`), of
///   that kind and context.
///
/// ```
/// runtime::messages! {
///     /// What the loans context publishes.
///     pub enum LoanEvent: Event in "loans" {
///         /// A book left the library.
///         BookLent { loan: String, book: String },
///         BookReturned { loan: String },
///     }
/// }
///
/// use runtime::{Message, Messages};
/// assert_eq!(LoanEvent::TYPES, ["BookLent", "BookReturned"]);
/// assert_eq!(BookLent::CONTEXT, "loans");
/// let e = LoanEvent::decode("BookReturned", br#"{"loan":"l-1"}"#).unwrap();
/// assert_eq!(e, LoanEvent::BookReturned(BookReturned { loan: "l-1".into() }));
/// assert!(LoanEvent::decode("BookLost", b"{}").is_err());
/// assert!(LoanEvent::decode("BookLent", br#"{"loan":"l-1"}"#).is_err());
/// let lent: LoanEvent = BookLent { loan: "l-2".into(), book: "Emma".into() }.into();
/// assert_eq!(lent.outgoing().msg_type, "BookLent");
/// ```
#[macro_export]
macro_rules! messages {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $kind:ident in $context:tt {
            $($(#[$tmeta:meta])* $ty:ident { $($field:ident : $fty:ty),* $(,)? }),+ $(,)?
        }
    ) => {
        $(
            $(#[$tmeta])*
            #[derive(Debug, Clone, PartialEq, ::serde::Serialize, ::serde::Deserialize)]
            $vis struct $ty {
                $($vis $field: $fty),*
            }
            $crate::message!($ty, $kind, $context);
        )+
        $crate::messages!($(#[$meta])* #[derive(Debug, Clone, PartialEq)] $vis enum $name { $($ty),+ });
    };
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($ty:ident),+ $(,)? }) => {
        $(#[$meta])*
        // Variants are named after their message types, whatever those share.
        #[allow(clippy::enum_variant_names)]
        $vis enum $name {
            $($ty($ty)),+
        }
        impl $crate::component::Messages for $name {
            const TYPES: &'static [&'static str] =
                &[$(<$ty as $crate::component::Message>::TYPE),+];
            const ROUTES: &'static [(&'static str, $crate::component::Kind)] = &[$((
                <$ty as $crate::component::Message>::CONTEXT,
                <$ty as $crate::component::Message>::KIND,
            )),+];
            fn decode(
                msg_type: &str,
                payload: &[u8],
            ) -> Result<Self, $crate::component::DecodeError> {
                $(
                    if msg_type == <$ty as $crate::component::Message>::TYPE {
                        return $crate::component::decode_as::<$ty>(payload).map($name::$ty);
                    }
                )+
                Err($crate::component::DecodeError::UnknownType(msg_type.to_string()))
            }
            fn outgoing(&self) -> $crate::component::Outgoing {
                match self {
                    $($name::$ty(m) => $crate::component::Outgoing::message(m)),+
                }
            }
        }
        $(
            impl From<$ty> for $name {
                fn from(m: $ty) -> Self {
                    $name::$ty(m)
                }
            }
        )+
    };
}

/// What one durable consumer receives: the listed types of one kind from one context.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Context whose stream holds the messages (the publisher for events, the addressee
    /// for commands).
    pub source: &'static str,
    /// Events or commands.
    pub kind: Kind,
    /// The wire type names it handles ([`Message::TYPE`]).
    pub types: Vec<&'static str>,
}

impl Subscription {
    /// The events of `types` that context `source` publishes.
    pub fn events(source: &'static str, types: &[&'static str]) -> Self {
        Subscription {
            source,
            kind: Kind::Event,
            types: types.to_vec(),
        }
    }

    /// The commands of `types` addressed to context `addressee`.
    pub fn commands(addressee: &'static str, types: &[&'static str]) -> Self {
        Subscription {
            source: addressee,
            kind: Kind::Command,
            types: types.to_vec(),
        }
    }

    /// What receives every type of a [`messages!`](crate::messages) enum: one subscription
    /// per context and kind, in the order the types are declared. For a component whose
    /// input is such an enum (with [`Messages::decode`] as its `decode`). A type declared
    /// without a context is a problem the context's `build` reports.
    pub fn of<E: Messages>() -> Vec<Subscription> {
        Self::grouped(
            E::TYPES
                .iter()
                .zip(E::ROUTES)
                .map(|(t, (source, kind))| (*source, *kind, *t)),
        )
    }

    /// `(context, kind, type)` triples as subscriptions, one per context and kind, in the
    /// order first seen.
    pub(crate) fn grouped(
        routes: impl IntoIterator<Item = (&'static str, Kind, &'static str)>,
    ) -> Vec<Subscription> {
        let mut subs: Vec<Subscription> = Vec::new();
        for (source, kind, msg_type) in routes {
            match subs
                .iter_mut()
                .find(|s| s.source == source && s.kind == kind)
            {
                Some(s) => s.types.push(msg_type),
                None => subs.push(Subscription {
                    source,
                    kind,
                    types: vec![msg_type],
                }),
            }
        }
        subs
    }

    /// The declared type named `msg_type`, if this subscription has it.
    pub fn declared(&self, msg_type: &str) -> Option<&'static str> {
        self.types.iter().copied().find(|t| *t == msg_type)
    }

    /// The subjects its durable consumer receives. Commands: everything addressed to the
    /// context, so that an unknown command type reaches the handler and is dead-lettered.
    /// Events: only the subscribed types (an event nobody subscribes to is not an error).
    pub fn filter_subjects(&self) -> Vec<String> {
        match self.kind {
            Kind::Command => vec![subjects::command(self.source, ">")],
            Kind::Event => self
                .types
                .iter()
                .map(|t| subjects::event(self.source, t))
                .collect(),
        }
    }
}

/// A message a handler sends: it goes through the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Event or command.
    pub kind: Kind,
    /// Publishing context for events (filled by the runtime), addressee for commands.
    pub context: Option<String>,
    /// The wire type name ([`Message::TYPE`]).
    pub msg_type: &'static str,
    /// The message as JSON.
    pub payload: String,
}

impl Outgoing {
    /// An event published on the handling context's own prefix.
    pub fn event<M: Message>(m: &M) -> Self {
        debug_assert_eq!(M::KIND, Kind::Event);
        Outgoing {
            kind: Kind::Event,
            context: None,
            msg_type: M::TYPE,
            payload: serde_json::to_string(m).expect("message serializes"),
        }
    }
    /// An event, or a command addressed to the context its [`Message`] declares.
    pub fn message<M: Message>(m: &M) -> Self {
        match M::KIND {
            Kind::Event => Outgoing::event(m),
            Kind::Command => {
                debug_assert!(!M::CONTEXT.is_empty(), "{} names no context", M::TYPE);
                Outgoing::command(M::CONTEXT, m)
            }
        }
    }

    /// A command addressed to `context`.
    pub fn command<M: Message>(context: &str, m: &M) -> Self {
        debug_assert_eq!(M::KIND, Kind::Command);
        Outgoing {
            kind: Kind::Command,
            context: Some(context.to_string()),
            msg_type: M::TYPE,
            payload: serde_json::to_string(m).expect("message serializes"),
        }
    }
}

/// A message a context's outbox published and JetStream stored (not a duplicate), as a
/// hook registered with `ContextBuilder::on_published` sees it: where an application
/// counts its own business metrics (registered in `telemetry::metrics::REGISTRY`).
#[derive(Debug, Clone, Copy)]
pub struct Published<'a> {
    /// The context that published it.
    pub context: &'a str,
    /// Its wire type name.
    pub msg_type: &'a str,
    /// The JSON payload, as sent.
    pub payload: &'a str,
}

/// A hook on published messages and the types it is called for.
#[derive(Clone)]
pub struct PublishedHook {
    /// The wire type names the hook is called for.
    pub types: Vec<&'static str>,
    /// Called once for each published message of those types.
    pub hook: Arc<dyn Fn(&Published<'_>) + Send + Sync>,
}

impl PublishedHook {
    /// Whether the hook wants messages of `msg_type`.
    pub fn wants(&self, msg_type: &str) -> bool {
        self.types.contains(&msg_type)
    }
}

/// Everything `handle` may know besides state and input: given as data, never read.
pub struct HandleCtx<'a> {
    /// The envelope of the message being handled (its id, correlation and causation).
    pub envelope: &'a Envelope,
    /// The time of the handling in milliseconds since the Unix epoch, fixed before the
    /// transaction: every run of `handle` for this attempt sees the same value.
    pub now_ms: u64,
    /// The external system's JSON reply, if `plan` asked for a call.
    pub external: Option<&'a serde_json::Value>,
}

/// How a message failed. Business rejections are not errors: they are events.
#[derive(Debug)]
pub enum HandleError {
    /// Try again later (nak with back-off): a prerequisite is missing or a dependency failed.
    Retry(String),
    /// Can never succeed: dead-letter now.
    Permanent(String),
    /// Store access failed; transaction conflicts are retried by the store itself.
    State(StateError),
}

impl From<StateError> for HandleError {
    fn from(e: StateError) -> Self {
        HandleError::State(e)
    }
}

impl From<crate::store::TxError> for HandleError {
    fn from(e: crate::store::TxError) -> Self {
        HandleError::State(StateError::Tx(e))
    }
}

/// The payload could not be decoded into the component's input: a dead-letter reason.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The component handles no message of this type (the type name).
    #[error("unknown message type {0:?} for this consumer")]
    UnknownType(String),
    /// The payload is not a valid message of its type.
    #[error("malformed {msg_type} payload: {error}")]
    Malformed {
        /// The wire type name the payload was decoded as.
        msg_type: String,
        /// What is wrong with it (the JSON decoder's message).
        error: String,
    },
}

/// The value of `field` in a decoded payload (a string, or a number as its text): the
/// instance of `what` (an aggregate, a saga) a message is for.
pub fn instance_id(
    msg_type: &str,
    payload: &serde_json::Value,
    field: &str,
    what: &str,
) -> Result<String, DecodeError> {
    match payload.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        _ => Err(DecodeError::Malformed {
            msg_type: msg_type.to_string(),
            error: format!("no string or number field {field:?} naming the {what}"),
        }),
    }
}

/// Decodes a JSON payload into `M`, naming the type on failure.
pub fn decode_as<M: Message>(payload: &[u8]) -> Result<M, DecodeError> {
    serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed {
        msg_type: M::TYPE.to_string(),
        error: e.to_string(),
    })
}

/// A message handler of one context.
pub trait Component: Send + Sync + 'static {
    /// A decoded message, as `plan` and `handle` take it (often an enum of the subscribed
    /// types).
    type Input: Send + Sync + 'static;
    /// Stable name: part of durable consumer names and inbox keys. Never rename.
    fn name(&self) -> &'static str;
    /// The messages it handles: one durable consumer per subscription.
    fn subscriptions(&self) -> Vec<Subscription>;
    /// The external systems `plan` may call (their circuit breakers and metrics exist from
    /// the start).
    fn external_systems(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Decodes the JSON `payload` of a message of `msg_type` (one of its subscribed types).
    /// An error dead-letters the message.
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Self::Input, DecodeError>;
    /// Decides, before the transaction, whether an external call is needed.
    fn plan(
        &self,
        _state: &dyn StateRead,
        _input: &Self::Input,
    ) -> Result<Option<ExternalCall>, HandleError> {
        Ok(None)
    }
    /// Applies the input inside the transaction. Deterministic; may run more than once.
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Self::Input,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError>;
}

/// What a handling decided besides its state changes: the messages it sends and, for a
/// saga, the instance it moved.
#[derive(Debug, Default)]
pub struct Decision {
    /// The messages it sends, through the outbox.
    pub send: Vec<Outgoing>,
    /// The saga instance it moved (for the saga gauges); `None` for any other component.
    pub saga_move: Option<SagaMove>,
}

impl From<Vec<Outgoing>> for Decision {
    fn from(send: Vec<Outgoing>) -> Self {
        Decision {
            send,
            saga_move: None,
        }
    }
}

/// Object-safe form of [`Component`] used by the runtime (inputs shared as `Any`: the
/// commit thread runs `handle` on them). Every [`Component`] is one; a saga's adapter
/// implements it directly, to return the instance it moved.
pub trait DynComponent: Send + Sync + 'static {
    /// Stable name: part of durable consumer names and inbox keys ([`Component::name`]).
    fn name(&self) -> &'static str;
    /// The messages it handles: one durable consumer per subscription.
    fn subscriptions(&self) -> Vec<Subscription>;
    /// The external systems `plan` may call ([`Component::external_systems`]).
    fn external_systems(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Decodes the JSON `payload` of a message of `msg_type` into its input, in the shared
    /// form `plan` and `handle` take ([`Component::decode`]).
    fn decode(
        &self,
        msg_type: &str,
        payload: &[u8],
    ) -> Result<Arc<dyn Any + Send + Sync>, DecodeError>;
    /// Decides, before the transaction, whether an external call is needed
    /// ([`Component::plan`]); `input` is what `decode` returned.
    fn plan(
        &self,
        state: &dyn StateRead,
        input: &(dyn Any + Send + Sync),
    ) -> Result<Option<ExternalCall>, HandleError>;
    /// Applies the input inside the transaction ([`Component::handle`]): the messages it
    /// sends and the saga instance it moved. Deterministic; may run more than once.
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &(dyn Any + Send + Sync),
        ctx: &HandleCtx<'_>,
    ) -> Result<Decision, HandleError>;
}

impl<C: Component> DynComponent for C {
    fn name(&self) -> &'static str {
        Component::name(self)
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        Component::subscriptions(self)
    }
    fn external_systems(&self) -> Vec<&'static str> {
        Component::external_systems(self)
    }
    fn decode(
        &self,
        msg_type: &str,
        payload: &[u8],
    ) -> Result<Arc<dyn Any + Send + Sync>, DecodeError> {
        Ok(Arc::new(Component::decode(self, msg_type, payload)?))
    }
    fn plan(
        &self,
        state: &dyn StateRead,
        input: &(dyn Any + Send + Sync),
    ) -> Result<Option<ExternalCall>, HandleError> {
        Component::plan(self, state, downcast::<C::Input>(input)?)
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &(dyn Any + Send + Sync),
        ctx: &HandleCtx<'_>,
    ) -> Result<Decision, HandleError> {
        Component::handle(self, tx, downcast::<C::Input>(input)?, ctx).map(Decision::from)
    }
}

/// The input of a component, from the shared form [`DynComponent::decode`] returned.
pub fn downcast<I: 'static>(input: &(dyn Any + Send + Sync)) -> Result<&I, HandleError> {
    input
        .downcast_ref::<I>()
        .ok_or_else(|| HandleError::Permanent("input of another component".into()))
}
