//! The declared graph of a saga: its states (terminal, with a deadline, or waiting without
//! one on purpose) and transitions, its checks, and Mermaid and DOT renderings.

use serde::Serialize;

/// A state of the declared graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateDef {
    /// The state's name, as [`ProcessManager::state_name`](super::ProcessManager::state_name)
    /// returns it.
    pub name: &'static str,
    /// An instance in this state has ended: entering it cancels every deadline, and the
    /// instance is removed after the retention period.
    pub terminal: bool,
    /// The deadline held while in this state.
    pub deadline: Option<&'static str>,
    /// Why this non-terminal state waits without a deadline, on purpose.
    pub waits_without_deadline: Option<&'static str>,
}

/// An edge of the declared graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransitionDef {
    /// The state the edge leaves.
    pub from: &'static str,
    /// What takes it: a message type, `deadline:<name>` or `retry`; alternatives separated
    /// by `|` (`StockCommitted|PaymentCaptured`).
    pub on: &'static str,
    /// The state the edge enters.
    pub to: &'static str,
}

/// The declared states and transitions of a saga, for graphs and checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Definition {
    /// The saga's name.
    pub name: &'static str,
    /// The state a new instance enters.
    pub initial: &'static str,
    /// Every state.
    pub states: Vec<StateDef>,
    /// Every edge.
    pub transitions: Vec<TransitionDef>,
}

impl Definition {
    /// The declared state `name`, if any.
    pub fn state(&self, name: &str) -> Option<&StateDef> {
        self.states.iter().find(|s| s.name == name)
    }

    /// True if `name` is a declared terminal state.
    pub fn is_terminal(&self, name: &str) -> bool {
        self.state(name).is_some_and(|s| s.terminal)
    }

    /// True if `from --on--> to` is a declared edge.
    pub fn allows(&self, from: &str, on: &str, to: &str) -> bool {
        from == to
            || self
                .transitions
                .iter()
                .any(|t| t.from == from && t.to == to && t.on.split('|').any(|o| o == on))
    }

    /// Problems with the declaration: undeclared states in edges, a non-terminal state with
    /// neither a deadline nor a reason to wait without one, a state nothing reaches.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for t in &self.transitions {
            for s in [t.from, t.to] {
                if self.state(s).is_none() {
                    p.push(format!(
                        "transition {} -{}-> {} names undeclared state {s}",
                        t.from, t.on, t.to
                    ));
                }
            }
        }
        for s in &self.states {
            if !s.terminal && s.deadline.is_none() && s.waits_without_deadline.is_none() {
                p.push(format!(
                    "state {} has no deadline and is not marked as waiting without one",
                    s.name
                ));
            }
            if s.name != self.initial && !self.transitions.iter().any(|t| t.to == s.name) {
                p.push(format!("state {} is never reached", s.name));
            }
            if !s.terminal && !self.transitions.iter().any(|t| t.from == s.name) {
                p.push(format!("non-terminal state {} has no way out", s.name));
            }
        }
        p
    }

    /// The edges to draw: one per pair of states, its triggers joined by `|`, in the order
    /// declared. Staying in a state (a resend, an answer recorded) is always allowed and
    /// not drawn.
    fn edges(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut edges: Vec<(&'static str, &'static str, String)> = Vec::new();
        for t in self.transitions.iter().filter(|t| t.from != t.to) {
            match edges.iter_mut().find(|e| (e.0, e.1) == (t.from, t.to)) {
                Some(e) => {
                    for on in t.on.split('|') {
                        if !e.2.split('|').any(|o| o == on) {
                            e.2.push('|');
                            e.2.push_str(on);
                        }
                    }
                }
                None => edges.push((t.from, t.to, t.on.to_string())),
            }
        }
        edges
    }

    /// The graph as a Mermaid state diagram.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("stateDiagram-v2\n");
        out.push_str(&format!("    [*] --> {}\n", self.initial));
        for (from, to, on) in self.edges() {
            out.push_str(&format!("    {from} --> {to}: {on}\n"));
        }
        for s in &self.states {
            if s.terminal {
                out.push_str(&format!("    {} --> [*]\n", s.name));
            } else if let Some(d) = s.deadline {
                out.push_str(&format!("    note right of {}: deadline {d}\n", s.name));
            } else if let Some(w) = s.waits_without_deadline {
                out.push_str(&format!(
                    "    note right of {}: no deadline ({w})\n",
                    s.name
                ));
            }
        }
        out
    }

    /// The graph in Graphviz DOT.
    pub fn dot(&self) -> String {
        let mut out = format!(
            "digraph \"{}\" {{\n  rankdir=LR;\n  start [shape=point];\n  start -> {};\n",
            self.name, self.initial
        );
        for s in &self.states {
            let shape = if s.terminal { "doublecircle" } else { "box" };
            let label = match s.deadline {
                Some(d) => format!("{}\\n(deadline {d})", s.name),
                None => s.name.to_string(),
            };
            out.push_str(&format!(
                "  {} [shape={shape}, label=\"{label}\"];\n",
                s.name
            ));
        }
        for (from, to, on) in self.edges() {
            out.push_str(&format!("  {from} -> {to} [label=\"{on}\"];\n"));
        }
        out.push_str("}\n");
        out
    }
}
