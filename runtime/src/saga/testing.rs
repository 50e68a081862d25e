//! Given/when/then for process managers, with time as data: no runtime, no clock.

use std::collections::BTreeMap;

use super::{ProcessManager, Trigger};
use crate::component::HandleError;

/// A saga instance driven by hand. Deadlines behave as in the runtime: setting one by
/// name replaces it, entering a terminal state cancels all, firing consumes it; and as in
/// the runtime a labelled transition (`when`, `advance`, `retry`) the declared graph does
/// not have is refused (`try_when` says why; `when` leaves the instance as it was).
pub struct Scenario<'a, P: ProcessManager> {
    pm: &'a P,
    /// The instance's state; `None` until a transition creates it.
    pub state: Option<P::State>,
    /// The scenario's clock, in milliseconds; starts at 0 and moves only by
    /// [`Scenario::advance`] (or by setting it).
    pub now_ms: u64,
    /// Pending deadlines: name -> due time.
    pub deadlines: BTreeMap<String, u64>,
    /// Types of every message sent, in order.
    pub sent: Vec<&'static str>,
    /// Every transition taken: (from, trigger, to).
    pub path: Vec<(String, String, String)>,
}

impl<'a, D> Scenario<'a, super::Saga<D>>
where
    D: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Applies a typed message to a saga declared with [`super::Saga`], labelled with its
    /// type. Panics if the message does not name its instance.
    pub fn receive<M: crate::component::Message + Send + Sync + 'static>(self, m: M) -> Self {
        let input = self
            .pm
            .message(m)
            .expect("the message names its saga instance");
        self.when(input, M::TYPE)
    }
}

impl<'a, P: ProcessManager> Scenario<'a, P> {
    /// A scenario of `pm` with no instance yet, at time 0.
    pub fn new(pm: &'a P) -> Self {
        Scenario {
            pm,
            state: None,
            now_ms: 0,
            deadlines: BTreeMap::new(),
            sent: vec![],
            path: vec![],
        }
    }

    /// Applies inputs in order (errors such as "not started yet" are ignored, as a
    /// redelivery would retry them).
    pub fn given(mut self, inputs: impl IntoIterator<Item = P::Input>) -> Self {
        for i in inputs {
            let _ = self.apply(Trigger::Message(&i), None);
        }
        self
    }

    /// Applies one input, labelled `on` in the path (its type name).
    pub fn when(mut self, input: P::Input, on: &str) -> Self {
        let _ = self.apply(Trigger::Message(&input), Some(on));
        self
    }

    /// Fallible form of [`Scenario::when`].
    pub fn try_when(&mut self, input: &P::Input, on: &str) -> Result<(), HandleError> {
        self.apply(Trigger::Message(input), Some(on))
    }

    /// Moves the clock forward by `ms`, firing every deadline that comes due, in order.
    pub fn advance(mut self, ms: u64) -> Self {
        let until = self.now_ms + ms;
        while let Some((name, at)) = self
            .deadlines
            .iter()
            .filter(|(_, at)| **at <= until)
            .min_by_key(|(_, at)| **at)
            .map(|(n, a)| (n.clone(), *a))
        {
            self.now_ms = self.now_ms.max(at);
            let _ = self.apply(Trigger::Deadline(&name), Some(&format!("deadline:{name}")));
        }
        self.now_ms = until;
        self
    }

    /// An operator retry.
    pub fn retry(mut self) -> Result<Self, HandleError> {
        self.apply(Trigger::Retry, Some("retry"))?;
        Ok(self)
    }

    /// The current state's name in the declared graph.
    pub fn status(&self) -> &'static str {
        self.state
            .as_ref()
            .map(|s| self.pm.state_name(s))
            .unwrap_or("(none)")
    }

    fn apply(
        &mut self,
        trigger: Trigger<'_, P::Input>,
        on: Option<&str>,
    ) -> Result<(), HandleError> {
        if let Trigger::Deadline(name) = trigger {
            if self.deadlines.remove(name).is_none() {
                return Ok(());
            }
        }
        let from = self.status().to_string();
        let Some(step) = self
            .pm
            .transition(self.state.as_ref(), trigger, self.now_ms)?
        else {
            return Ok(());
        };
        let to = self.pm.state_name(&step.state);
        // `given` does not label its inputs: only labelled steps are checked.
        if let Some(on) = on {
            let was = self.state.as_ref().map(|_| from.as_str());
            super::instance::check_declared(&self.pm.definition(), was, on, to)
                .map_err(HandleError::Permanent)?;
        }
        for c in &step.cancel {
            self.deadlines.remove(c);
        }
        if self.pm.definition().is_terminal(to) {
            self.deadlines.clear();
        } else {
            for d in &step.set {
                self.deadlines.insert(d.name.clone(), d.at_ms);
            }
        }
        self.sent.extend(step.send.iter().map(|o| o.msg_type));
        self.path
            .push((from, on.unwrap_or("message").to_string(), to.to_string()));
        self.state = Some(step.state);
        Ok(())
    }
}

/// Sagas for the runtime's own tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::component::{DecodeError, HandleError, Subscription};
    use crate::saga::{Definition, ProcessManager, StateDef, Step, TransitionDef, Trigger};

    /// A counter saga: every message adds one. Its graph: one state, `Counting`, or with
    /// `ends` a terminal `Done`; with `steps`, `Start` (count 1) then `Done`, the graph
    /// declaring only `Start -Finish-> Done`.
    pub(crate) struct Counter {
        pub name: &'static str,
        pub ends: bool,
        pub steps: bool,
    }

    pub(crate) const COUNTER: Counter = Counter {
        name: "counter",
        ends: false,
        steps: false,
    };

    pub(crate) const STEPPER: Counter = Counter {
        name: "stepper",
        ends: false,
        steps: true,
    };

    impl ProcessManager for Counter {
        type State = u64;
        type Input = ();
        fn name(&self) -> &'static str {
            self.name
        }
        fn subscriptions(&self) -> Vec<Subscription> {
            vec![]
        }
        fn decode(&self, _: &str, _: &[u8]) -> Result<(), DecodeError> {
            Ok(())
        }
        fn correlate(&self, _: &()) -> String {
            "one".into()
        }
        fn transition(
            &self,
            s: Option<&u64>,
            _: Trigger<'_, ()>,
            _: u64,
        ) -> Result<Option<Step<u64>>, HandleError> {
            Ok(Some(Step::to(s.copied().unwrap_or(0) + 1)))
        }
        fn state_name(&self, n: &u64) -> &'static str {
            match (self.steps, self.ends) {
                (true, _) if *n <= 1 => "Start",
                (true, _) | (false, true) => "Done",
                (false, false) => "Counting",
            }
        }
        fn definition(&self) -> Definition {
            let state = |name, terminal| StateDef {
                name,
                terminal,
                deadline: None,
                waits_without_deadline: (self.steps && !terminal).then_some("a test"),
            };
            let (states, transitions) = if self.steps {
                let finish = TransitionDef {
                    from: "Start",
                    on: "Finish",
                    to: "Done",
                };
                (
                    vec![state("Start", false), state("Done", true)],
                    vec![finish],
                )
            } else {
                (vec![state(self.state_name(&1), self.ends)], vec![])
            };
            Definition {
                name: self.name,
                initial: states[0].name,
                states,
                transitions,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::STEPPER;
    use super::Scenario;

    /// As in the runtime, a labelled step the graph does not declare is refused.
    #[test]
    fn an_undeclared_step_is_refused_as_in_the_runtime() {
        let mut s = Scenario::new(&STEPPER).when((), "Begin");
        assert_eq!(s.status(), "Start");
        let e = format!("{:?}", s.try_when(&(), "Other").unwrap_err());
        assert!(
            e.contains("undeclared transition Start -Other-> Done"),
            "{e}"
        );
        assert_eq!(s.status(), "Start");
        let s = s.when((), "Finish");
        assert_eq!(s.status(), "Done");
        assert_eq!(s.path.len(), 2);
    }
}
