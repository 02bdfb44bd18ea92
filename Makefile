# peermirror: build, test, demo. Tests and the demo need root (containerd).

GO          ?= go
TOOLS_BIN   := $(CURDIR)/.tools/bin
CADDY       := $(CURDIR)/bin/caddy
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
XCADDY      := github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5
CADDY_VERSION := v2.11.9
HELM        := $(TOOLS_BIN)/helm
CHART       := charts/peermirror
# go test budget: a generous hang detector for the whole run
TEST_TIMEOUT ?= 30m
# fuzz-short: time per fuzz target, and the targets as package:name
FUZZTIME    ?= 10s
FUZZ_TARGETS := caddymodule:FuzzParseRequest caddymodule:FuzzParseRange caddymodule:FuzzMeasureReference \
	contentstore:FuzzDetectMediaType contentstore:FuzzDetectMediaTypeRules

.PHONY: all build tools test test-short fuzz-short load lint demo bench xcaddy chart clean

all: build

## build: a full Caddy (standard modules plus peermirror) in bin/caddy
build:
	$(GO) build -o $(CADDY) ./cmd/caddy

## tools: containerd, ctr, the distribution registry, crictl, crane and helm in
## .tools/bin; Debian's chromium when missing (as root)
tools:
	@hack/install-tools.sh

## test: every test, against real containerd, registry and Caddy; one package
## at a time, so the multi-node tests face their own load, not another
## package's build; then a short fuzz of each fuzz target
test: tools build chart
	PEERMIRROR_CADDY=$(CADDY) $(GO) test -race -p 1 -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) fuzz-short

## fuzz-short: each fuzz target for $(FUZZTIME); go test fuzzes one target
## per run. A failing input is kept in the package's testdata/fuzz.
fuzz-short:
	@set -e; for target in $(FUZZ_TARGETS); do \
		pkg=$${target%%:*}; name=$${target#*:}; \
		echo "fuzz $$name in ./$$pkg for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -timeout 5m ./$$pkg; \
	done

## load: the load test's long form: LOAD_CLIENTS clients for LOAD_DURATION
## through three nodes, without the race detector (which would make the
## test's own clients the bottleneck); make test runs a short form
LOAD_DURATION ?= 2m
LOAD_CLIENTS  ?= 64
load: tools build
	PEERMIRROR_CADDY=$(CADDY) PEERMIRROR_LOAD_DURATION=$(LOAD_DURATION) PEERMIRROR_LOAD_CLIENTS=$(LOAD_CLIENTS) \
		$(GO) test -run '^TestLoad$$' -count 1 -v -timeout 30m ./caddytest

## test-short: the unit tests only (no containerd, no root)
test-short:
	$(GO) test -short -timeout 5m ./...

## lint: go vet and staticcheck (pinned)
lint:
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

## demo: three nodes (containerd and Caddy each) and a registry on loopback; A pulls
## from the registry, B and C through their own mirrors from A
demo: tools build
	PEERMIRROR_CADDY=$(CADDY) $(GO) run ./hack/demo

# BENCH_QUICK=1: the short form (smaller blobs, fewer requests), for CI
# (written to bin/BENCHMARKS-quick.md, leaving BENCHMARKS.md as it is)
ifdef BENCH_QUICK
BENCH_ENV   := PEERMIRROR_BENCH_SIZE=134217728 PEERMIRROR_BENCH_PEER_SIZE=67108864
BENCH_TIMES := 2x
BENCH_OUT   := bin/BENCHMARKS-quick.md
else
BENCH_ENV   :=
BENCH_TIMES := 5x
BENCH_OUT   := BENCHMARKS.md
endif

## bench: the Go benchmarks (blob GETs from the local store and through a
## peer), then the harness, which writes BENCHMARKS.md (local serving
## against the registry and file_server, latency through a peer, memory
## and start-up), then the cold storm table, appended to it
bench: tools build
	PEERMIRROR_CADDY=$(CADDY) $(BENCH_ENV) $(GO) test -run '^$$' -bench . -benchtime $(BENCH_TIMES) -timeout 20m ./bench/
	@PEERMIRROR_CADDY=$(CADDY) PEERMIRROR_BENCH_HARNESS=1 PEERMIRROR_BENCH_OUT=$(CURDIR)/$(BENCH_OUT) $(GO) test -run '^TestHarness$$' -count 1 -v -timeout 30m \
		./bench/ >bin/bench-harness.log 2>&1 || { tail -50 bin/bench-harness.log; exit 1; }
	@PEERMIRROR_CADDY=$(CADDY) PEERMIRROR_BENCH_COLD=1 $(GO) test -run '^TestColdStormTable$$' -count 1 -v -timeout 20m \
		./caddytest >bin/cold-storms.log 2>&1 || { tail -50 bin/cold-storms.log; exit 1; }
	@{ echo; echo "## 4. Every node pulling a new image at once (cold storms)"; echo; grep -E '^ +\||cold storms' bin/cold-storms.log | sed 's/^ *//; s/^[a-z_]*_test.go:[0-9]*: //'; } >>$(BENCH_OUT)
	@cat $(BENCH_OUT)

## chart: helm lint and helm template of the chart, with the default and the GPU values
chart: tools
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) -f $(CHART)/values-gpu.yaml
	$(HELM) template pm $(CHART) >/dev/null
	$(HELM) template pm $(CHART) -f $(CHART)/values-gpu.yaml >/dev/null

## xcaddy: the same Caddy built the way plugin users build it
xcaddy:
	$(GO) run $(XCADDY) build $(CADDY_VERSION) --output $(CADDY) \
		--with github.com/peermirror/peermirror@v0.0.0=$(CURDIR)

clean:
	rm -rf bin
