//! A library's loans, built on Choreo's runtime from outside its workspace: a context that
//! lends books and a saga that marks a loan overdue when its due date passes.

use runtime::app::App;
use runtime::component::{decode_as, DecodeError, HandleCtx, HandleError, Outgoing};
use runtime::context::ContextBuilder;
use runtime::saga::{Deadline, Definition, ProcessManager, StateDef, Step, TransitionDef, Trigger};
use runtime::{load, read, save, Component, Message, StateTx, Subscription};
use serde::{Deserialize, Serialize};

const CONTEXT: &str = "loans";

#[derive(Serialize, Deserialize)]
struct LendBook {
    loan: String,
    book: String,
    due_in_ms: u64,
}
runtime::message!(LendBook, Command);

#[derive(Serialize, Deserialize)]
struct MarkOverdue {
    loan: String,
}
runtime::message!(MarkOverdue, Command);

#[derive(Serialize, Deserialize)]
struct BookLent {
    loan: String,
    due_at_ms: u64,
}
runtime::message!(BookLent, Event);

#[derive(Serialize, Deserialize)]
struct Loan {
    book: String,
    status: String,
}

enum Command {
    Lend(LendBook),
    Overdue(MarkOverdue),
}

/// The loans aggregate: lends a book once per loan id, marks a loan overdue.
struct Loans;

impl Component for Loans {
    type Input = Command;
    fn name(&self) -> &'static str {
        "loans"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::commands(
            CONTEXT,
            &[LendBook::TYPE, MarkOverdue::TYPE],
        )]
    }
    fn decode(&self, msg_type: &str, payload: &[u8]) -> Result<Command, DecodeError> {
        match msg_type {
            LendBook::TYPE => Ok(Command::Lend(decode_as(payload)?)),
            MarkOverdue::TYPE => Ok(Command::Overdue(decode_as(payload)?)),
            other => Err(DecodeError::UnknownType(other.to_string())),
        }
    }
    fn handle(
        &self,
        tx: &dyn StateTx,
        input: &Command,
        ctx: &HandleCtx<'_>,
    ) -> Result<Vec<Outgoing>, HandleError> {
        match input {
            Command::Lend(c) => {
                let key = format!("loan/{}", c.loan);
                if load::<Loan>(tx, &key)?.is_some() {
                    return Ok(vec![]);
                }
                let loan = Loan {
                    book: c.book.clone(),
                    status: "lent".into(),
                };
                save(tx, &key, &loan)?;
                let due_at_ms = ctx.now_ms + c.due_in_ms;
                Ok(vec![Outgoing::event(&BookLent {
                    loan: c.loan.clone(),
                    due_at_ms,
                })])
            }
            Command::Overdue(c) => {
                let key = format!("loan/{}", c.loan);
                let mut loan: Loan = load(tx, &key)?
                    .ok_or_else(|| HandleError::Permanent(format!("no loan {}", c.loan)))?;
                loan.status = "overdue".into();
                save(tx, &key, &loan)?;
                Ok(vec![])
            }
        }
    }
}

/// A loan's saga: lent until its due date, then overdue.
struct LoanSaga;

#[derive(Clone, Serialize, Deserialize)]
struct LoanState {
    loan: String,
    overdue: bool,
}

impl ProcessManager for LoanSaga {
    type State = LoanState;
    type Input = BookLent;
    fn name(&self) -> &'static str {
        "loan"
    }
    fn subscriptions(&self) -> Vec<Subscription> {
        vec![Subscription::events(CONTEXT, &[BookLent::TYPE])]
    }
    fn decode(&self, _: &str, payload: &[u8]) -> Result<BookLent, DecodeError> {
        decode_as(payload)
    }
    fn correlate(&self, lent: &BookLent) -> String {
        lent.loan.clone()
    }
    fn transition(
        &self,
        state: Option<&LoanState>,
        trigger: Trigger<'_, BookLent>,
        _now_ms: u64,
    ) -> Result<Option<Step<LoanState>>, HandleError> {
        Ok(match (state, trigger) {
            (None, Trigger::Message(lent)) => Some(
                Step::to(LoanState {
                    loan: lent.loan.clone(),
                    overdue: false,
                })
                .set(Deadline::at("due", lent.due_at_ms)),
            ),
            (Some(s), Trigger::Deadline("due")) if !s.overdue => Some(
                Step::to(LoanState {
                    overdue: true,
                    ..s.clone()
                })
                .send(Outgoing::command(
                    CONTEXT,
                    &MarkOverdue {
                        loan: s.loan.clone(),
                    },
                )),
            ),
            _ => None,
        })
    }
    fn state_name(&self, state: &LoanState) -> &'static str {
        if state.overdue {
            "Overdue"
        } else {
            "Lent"
        }
    }
    fn definition(&self) -> Definition {
        let state = |name, deadline, terminal| StateDef {
            name,
            terminal,
            deadline,
            waits_without_deadline: None,
        };
        Definition {
            name: "loan",
            initial: "Lent",
            states: vec![
                state("Lent", Some("due"), false),
                state("Overdue", None, true),
            ],
            transitions: vec![TransitionDef {
                from: "Lent",
                on: "deadline:due",
                to: "Overdue",
            }],
        }
    }
}

fn main() -> std::process::ExitCode {
    App::new("loans")
        .context(CONTEXT, |_config| {
            Ok(ContextBuilder::new(CONTEXT)
                .component(Loans)
                .saga(LoanSaga)
                .query("loan", |state, request| {
                    let id = runtime::request_field(request, "loan")?;
                    Ok(serde_json::json!(read::<Loan>(
                        state,
                        &format!("loan/{id}")
                    )?))
                })
                .build()?)
        })
        .run()
}
