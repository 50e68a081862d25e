//! A library's loans, built on Choreo's runtime from outside its workspace: an aggregate
//! that lends books and takes them back, and a saga that marks a loan overdue when its due
//! date passes.

use runtime::prelude::*;
use serde::{Deserialize, Serialize};

const CONTEXT: &str = "loans";

runtime::messages! {
    enum LoanCommand: Command in CONTEXT {
        LendBook { loan: String, book: String, due_in_ms: u64 },
        ReturnBook { loan: String },
        MarkOverdue { loan: String },
    }
}

runtime::messages! {
    enum LoanEvent: Event in CONTEXT {
        BookLent { loan: String, book: String, due_at_ms: u64 },
        BookReturned { loan: String },
        LoanOverdue { loan: String },
    }
}

/// A loan: no book until it is lent; lends a book once per loan id, takes it back, marks
/// it overdue.
#[derive(Default, Serialize, Deserialize)]
struct Loan {
    book: Option<String>,
    returned: bool,
    overdue: bool,
}

impl Aggregate for Loan {
    const NAME: &'static str = "loan";
    const ID: &'static str = "loan";
    type Command = LoanCommand;
    type Event = LoanEvent;

    fn decide(&self, command: &LoanCommand, now: u64) -> Decided<LoanEvent> {
        let open = self.book.is_some() && !self.returned;
        Ok(match command {
            LoanCommand::LendBook(c) if self.book.is_none() => {
                let due_at_ms = now + c.due_in_ms;
                let (loan, book) = (c.loan.clone(), c.book.clone());
                vec![BookLent {
                    loan,
                    book,
                    due_at_ms,
                }
                .into()]
            }
            LoanCommand::LendBook(_) => vec![], // the same loan again: already lent
            _ if self.book.is_none() => return Err(Rejection::new("no such loan")),
            LoanCommand::ReturnBook(c) if open => vec![BookReturned {
                loan: c.loan.clone(),
            }
            .into()],
            LoanCommand::MarkOverdue(c) if open && !self.overdue => {
                vec![LoanOverdue {
                    loan: c.loan.clone(),
                }
                .into()]
            }
            _ => vec![], // returned already, or overdue already
        })
    }

    fn apply(&mut self, event: &LoanEvent) {
        match event {
            LoanEvent::BookLent(e) => self.book = Some(e.book.clone()),
            LoanEvent::BookReturned(_) => self.returned = true,
            LoanEvent::LoanOverdue(_) => self.overdue = true,
        }
    }
}

/// Watches a loan's due date: returned in time, or overdue (the saga's data is the loan id).
fn due_date() -> Saga<String> {
    Saga::new("due-date")
        .correlated_by("loan")
        .starts_with("Lent", |lent: &BookLent, _now| {
            Step::to(lent.loan.clone()).set(Deadline::at("due", lent.due_at_ms))
        })
        .on("Lent", "Returned", |loan, _: &BookReturned, _now| {
            Step::to(loan.clone())
        })
        .on_deadline("Lent", "due", "Overdue", |loan, _now| {
            let mark = MarkOverdue { loan: loan.clone() };
            Step::to(loan.clone()).send(Outgoing::message(&mark))
        })
        .terminal("Returned")
        .terminal("Overdue")
}

fn main() -> std::process::ExitCode {
    let loans = ContextBuilder::new(CONTEXT)
        .aggregate::<Loan>()
        .saga(due_date());
    App::new("loans").with(loans).run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::saga::testing::Scenario;

    #[test]
    fn a_loan_is_overdue_once_its_due_date_passes() {
        let saga = due_date();
        let lent = BookLent {
            loan: "l-1".into(),
            book: "Dune".into(),
            due_at_ms: 1_000,
        };
        let s = Scenario::new(&saga).receive(lent).advance(999);
        assert_eq!(s.status(), "Lent");
        let s = s.advance(1);
        assert_eq!(s.status(), "Overdue");
        assert_eq!(s.sent, ["MarkOverdue"]);
    }

    #[test]
    fn a_book_is_lent_once_and_a_returned_loan_is_not_overdue() {
        let lend = LendBook {
            loan: "l-1".into(),
            book: "Dune".into(),
            due_in_ms: 10,
        }
        .into();
        let mut loan = Loan::default();
        let lent = loan.decide(&lend, 5).unwrap();
        assert!(matches!(&lent[..], [LoanEvent::BookLent(e)] if e.due_at_ms == 15));
        loan.apply(&lent[0]);
        assert!(loan.decide(&lend, 6).unwrap().is_empty());
        loan.apply(&BookReturned { loan: "l-1".into() }.into());
        let overdue = loan.decide(&MarkOverdue { loan: "l-1".into() }.into(), 20);
        assert!(overdue.unwrap().is_empty());
        let unknown = Loan::default().decide(&ReturnBook { loan: "x".into() }.into(), 0);
        assert_eq!(unknown.unwrap_err(), Rejection::new("no such loan"));
    }
}
