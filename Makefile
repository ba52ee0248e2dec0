# splitlearn-comm: build, test, demo, sanitizers, benchmarks.
#
#   make demo    set everything up, then run a server hosting a torch model and a client
#   make test    set everything up, then run the C tests and the whole pytest suite
#   make test-big   a 3 GiB streamed round trip with each side's peak memory checked
#   make asan    the same tests against an ASan+UBSan build of the extension
#   make bench   the benchmarks (write benchmarks/results.md, its data and its figures);
#                first builds the C-core echo floor (build/bench/echo_floor, core_echo)
#   make dashboard-screenshot   regenerate docs/images/dashboard*.png (headless Chromium)
#   make wheel   the sdist, and from it self-contained manylinux wheels for CPython
#                3.10-3.13 (auditwheel repair), in dist/
#   make check-wheel   each wheel in a fresh venv, a round trip with Debian's gRPC hidden
#   make test-pythons  the test suite against each wheel in a fresh venv of its Python
#   make typecheck     mypy --strict on the package
#   make fuzz    libFuzzer targets (wire reader, codecs, shapes), FUZZ_SECONDS each
#   make fuzz-server  mutated requests from a raw grpcio client against an ASan server
#   make soak    64 threads + 16 processes of clients, a server killed and restarted
#
#   docs/testing.md describes the fuzz, fault and soak targets.
#
# Set-up is idempotent: Debian packages are installed only when missing, the
# virtual environment (.venv) is made once.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
GEN      := build/gen
CBIN     := build/ctest
PKGS     := grpc libprotobuf-c zlib libzstd
CFLAGS_C := -std=gnu11 -g -O1 -Wall -Wextra -Werror -Wno-missing-field-initializers \
            -fno-omit-frame-pointer -Icsrc/core -I$(GEN)
CORE_SRC := $(wildcard csrc/core/*.c)
CTESTS   := $(patsubst tests/c/%.c,$(CBIN)/%,$(wildcard tests/c/test_*.c))
SAN      := -fsanitize=address,undefined -fno-sanitize-recover=undefined

PY_VERSIONS ?= 3.10 3.11 3.12 3.13

.PHONY: all deps venv install build ctest pytest test test-big demo asan asan-ctest asan-pytest bench bench-floor \
        bench-figures dashboard-screenshot clean wheel check-wheel test-pythons typecheck \
        fuzz fuzz-deps fuzz-build fuzz-corpus fuzz-ci fuzz-server fuzz-server-run fuzz-server-ci \
        asan-build soak soak-ci robust-ci

all: install

deps:
	sh scripts/install-system-deps.sh

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

venv: deps $(VENV)/.deps

# the editable install builds splitlearn_comm/_core*.so in place
install: venv
	$(PIP) install -q --disable-pip-version-check --no-build-isolation \
	  --config-settings editable_mode=compat -e .

build: install

$(GEN)/splitlearn_comm.pb-c.c: proto/splitlearn_comm.proto proto/health.proto scripts/gen_proto.py
	$(PYTHON) scripts/gen_proto.py $(GEN) >/dev/null

# C unit tests: the core alone, no Python, under ASan+UBSan with leak checking.
$(CBIN)/%: tests/c/%.c tests/c/sl_test.h $(CORE_SRC) $(GEN)/splitlearn_comm.pb-c.c
	@mkdir -p $(CBIN)
	@echo "CC $@"
	@$(CC) $(CFLAGS_C) $(SAN) $(shell pkg-config --cflags $(PKGS)) -o $@ $< $(CORE_SRC) \
	  $(GEN)/splitlearn_comm.pb-c.c $(GEN)/health.pb-c.c $(shell pkg-config --libs $(PKGS)) -lpthread -lm

# The floor of any gRPC design (a unary echo on the bare C core, no copies) and the
# same round trip through our core with a C compute hook (no Python): C programs,
# optimised like the extension, run by bench_roundtrip.py beside the Python rows.
BENCH_BIN    := build/bench
BENCH_CFLAGS := -std=gnu11 -g -O2 -Wall -Wextra -Werror -Wno-missing-field-initializers \
                -fno-omit-frame-pointer -Icsrc/core -I$(GEN) -Ibenchmarks/floor
$(BENCH_BIN)/echo_floor: benchmarks/floor/echo_floor.c benchmarks/floor/floor_common.h
	@mkdir -p $(BENCH_BIN)
	@echo "CC $@"
	@$(CC) $(BENCH_CFLAGS) $(shell pkg-config --cflags grpc) -o $@ $< \
	  $(shell pkg-config --libs grpc) -lpthread

$(BENCH_BIN)/core_echo: benchmarks/floor/core_echo.c benchmarks/floor/floor_common.h $(CORE_SRC) \
                        $(GEN)/splitlearn_comm.pb-c.c
	@mkdir -p $(BENCH_BIN)
	@echo "CC $@"
	@$(CC) $(BENCH_CFLAGS) $(shell pkg-config --cflags $(PKGS)) -o $@ $< $(CORE_SRC) \
	  $(GEN)/splitlearn_comm.pb-c.c $(GEN)/health.pb-c.c $(shell pkg-config --libs $(PKGS)) -lpthread -lm

# The fuzz targets' inputs replayed with gcc's ASan+UBSan (no clang needed): the
# seed corpora and every crash once found stay regression tests.
FUZZ_TARGETS := message codec shape
REPLAYS  := $(patsubst %,$(CBIN)/replay_%,$(FUZZ_TARGETS))
$(CBIN)/replay_%: tests/fuzz/fuzz_%.c tests/fuzz/replay.c tests/fuzz/fuzz_input.h $(CORE_SRC) $(GEN)/splitlearn_comm.pb-c.c
	@mkdir -p $(CBIN)
	@echo "CC $@"
	@$(CC) $(CFLAGS_C) -Itests/fuzz $(SAN) -DSL_LEND_MIN_BYTES=1 $(shell pkg-config --cflags $(PKGS)) -o $@ $< tests/fuzz/replay.c \
	  $(CORE_SRC) $(GEN)/splitlearn_comm.pb-c.c $(GEN)/health.pb-c.c $(shell pkg-config --libs $(PKGS)) -lpthread -lm

ctest: deps $(CTESTS) $(REPLAYS) $(BENCH_BIN)/echo_floor $(BENCH_BIN)/core_echo
	@set -e; for t in $(CTESTS); do ASAN_OPTIONS=detect_leaks=1 ./$$t; done
	@set -e; for t in $(FUZZ_TARGETS); do ASAN_OPTIONS=detect_leaks=1 ./$(CBIN)/replay_$$t tests/fuzz/corpus/$$t; done
	@# the floor programs of make bench, briefly: each exits non-zero when an echo comes back wrong
	@./$(BENCH_BIN)/echo_floor --sizes 3072,1048576 --n 10 --cold 1048576 --cold-calls 2 >/dev/null
	@./$(BENCH_BIN)/core_echo --sizes 3072,1048576 --n 10 --cold 1048576 --cold-calls 2 >/dev/null
	@echo "floor programs: ok"

pytest: install
	$(PY) -m pytest -q tests

test: ctest pytest

# A 3 GiB tensor round-tripped (streamed, over gRPC's 2 GiB message limit), each
# side's peak RSS checked: ~10 GiB of memory and under a minute; CI runs it.
test-big: install
	SPLITLEARN_TEST_BIG=1 $(PY) -m pytest -q -s tests/test_stream_big.py

demo: install
	$(PY) examples/demo.py

# The extension built with ASan+UBSan into build/asan, then the C tests and the
# Python suite against it with the sanitizer runtime preloaded. Leak detection is
# on for the C tests; off for Python, where CPython and PyTorch keep memory
# until exit by design.
ASAN_LIB = $(shell $(CC) -print-file-name=libasan.so)
UBSAN_LIB = $(shell $(CC) -print-file-name=libubsan.so)
asan: ctest asan-pytest

asan-build: install
	rm -rf build/asan && mkdir -p build/asan
	SPLITLEARN_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-tmp --force
	cp splitlearn_comm/*.py splitlearn_comm/*.pyi splitlearn_comm/*.html splitlearn_comm/py.typed build/asan/splitlearn_comm/

asan-pytest: asan-build
	LD_PRELOAD="$(ASAN_LIB) $(UBSAN_LIB)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 SPLITLEARN_TEST_SANITIZED=1 \
	  PYTHONPATH=$(CURDIR)/build/asan $(PY) -P -m pytest -q -p no:cacheprovider tests

bench-floor: deps $(BENCH_BIN)/echo_floor $(BENCH_BIN)/core_echo

bench: install bench-floor
	$(PY) benchmarks/bench_roundtrip.py
	$(PY) benchmarks/bench_breakdown.py
	$(PY) benchmarks/bench_multiclient.py
	$(PY) benchmarks/bench_cold.py
	$(PY) benchmarks/bench_shm.py
	$(PY) benchmarks/bench_codecs.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_tensormap.py
	$(PY) benchmarks/bench_async.py
	$(PY) benchmarks/bench_sessions.py
	$(PY) benchmarks/bench_replicas.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_stream.py
	$(PY) benchmarks/bench_summary.py
	$(MAKE) bench-figures

# The PNG figures beside results.md, from the data the benchmarks wrote
# (benchmarks/data/*.json); matplotlib is installed here, not for the tests.
bench-figures: install
	$(PIP) install -q --disable-pip-version-check matplotlib
	$(PY) benchmarks/plot_results.py

# docs/images/dashboard.png and dashboard-phone.png: a server under load, its
# dashboard opened in headless Chromium (installed by `make deps` where it can be).
dashboard-screenshot: install
	$(PY) scripts/dashboard_screenshot.py --out docs/images

# The sdist from this tree, then one wheel per Python built from that sdist (so the
# sdist is proven complete), then auditwheel repair: the gRPC C core and the
# libraries under it are copied into splitlearn_comm.libs/ under hashed names.
wheel: install
	rm -rf dist build/wheel-raw
	$(PY) -m build --sdist -o dist .
	set -e; for v in $(PY_VERSIONS); do \
	  py=$$(sh scripts/python-for.sh $$v); echo "building the wheel for $$py"; \
	  mkdir -p build/wheel-raw; \
	  $$py -m pip wheel -q --disable-pip-version-check --no-deps -w build/wheel-raw dist/*.tar.gz \
	    > build/wheel-raw/$$v.log 2>&1 || { cat build/wheel-raw/$$v.log; exit 1; }; done
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/auditwheel repair -w dist build/wheel-raw/*.whl
	ls -l dist

check-wheel: wheel
	set -e; for v in $(PY_VERSIONS); do \
	  sh scripts/check-wheel.sh $$(sh scripts/python-for.sh $$v) \
	    $$(ls dist/*-cp$$(echo $$v | tr -d .)-*manylinux*.whl); done

# torch-free on every Python but TORCH_PYTHONS (3.11): see scripts/test-python.sh
test-pythons: wheel
	@failed=""; for v in $(PY_VERSIONS); do \
	  sh scripts/test-python.sh $$v > build/pytests-$$v.log 2>&1 || failed="$$failed $$v"; \
	  cat build/pytests-$$v.log; done; \
	for v in $(PY_VERSIONS); do echo "CPython $$v: $$(tail -n 1 build/pytests-$$v.log)"; done; \
	if [ -n "$$failed" ]; then echo "failed on:$$failed"; exit 1; fi

typecheck: install
	$(PY) -m mypy

# ---- the server under mutated requests (a raw grpcio client, an ASan server) ----
FUZZ_SERVER_SECONDS ?= 60
FUZZ_SERVER_CI_SECONDS ?= 20
fuzz-server: asan-build
	@$(MAKE) --no-print-directory fuzz-server-run

fuzz-server-run:
	FUZZ_SERVER_LD_PRELOAD="$(ASAN_LIB) $(UBSAN_LIB)" FUZZ_SERVER_PYTHONPATH=$(CURDIR)/build/asan \
	  FUZZ_SERVER_ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  FUZZ_SERVER_UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PY) tests/fuzz/fuzz_server.py --seconds $(FUZZ_SERVER_SECONDS)

fuzz-server-ci:
	@$(MAKE) --no-print-directory fuzz-server FUZZ_SERVER_SECONDS=$(FUZZ_SERVER_CI_SECONDS)

# ---- soak: 64 client threads + 16 client processes, kill -9 of server and clients ----
soak: install
	$(PY) tests/soak/soak.py --threads 64 --procs 16 --calls 60000 --rounds 8

soak-ci: install
	$(PY) tests/soak/soak.py --threads 16 --procs 4 --calls 4000 --rounds 4

# What CI runs after `make test` (.ci/run): each fuzz target for FUZZ_CI_SECONDS,
# the Python suite against the ASan build, the ASan server under mutated requests,
# and the short soak.
robust-ci: install
	@$(MAKE) --no-print-directory fuzz-ci
	@$(MAKE) --no-print-directory asan-pytest
	@$(MAKE) --no-print-directory fuzz-server-run FUZZ_SERVER_SECONDS=$(FUZZ_SERVER_CI_SECONDS)
	@$(MAKE) --no-print-directory soak-ci

# ---- fuzzing (libFuzzer, clang from Debian: scripts/install-fuzz-deps.sh) ----
FUZZ_CC      ?= clang-14
FUZZ_SECONDS ?= 60
FUZZ_CI_SECONDS ?= 20
FUZZ_BINS    := $(patsubst %,build/fuzz/fuzz_%,$(FUZZ_TARGETS))
FUZZ_FLAGS   := -std=gnu11 -g -O1 -fno-omit-frame-pointer -Wall -Wextra -Werror \
                -Wno-missing-field-initializers -Icsrc/core -I$(GEN) -Itests/fuzz \
                -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
                -DSL_LEND_MIN_BYTES=1

fuzz-deps:
	sh scripts/install-fuzz-deps.sh

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_input.h $(CORE_SRC) $(GEN)/splitlearn_comm.pb-c.c
	@mkdir -p build/fuzz
	@echo "FUZZ_CC $@"
	@$(FUZZ_CC) $(FUZZ_FLAGS) $(shell pkg-config --cflags $(PKGS)) -o $@ $< $(CORE_SRC) \
	  $(GEN)/splitlearn_comm.pb-c.c $(GEN)/health.pb-c.c $(shell pkg-config --libs $(PKGS)) -lpthread -lm

fuzz-build: deps fuzz-deps
	@$(MAKE) --no-print-directory $(FUZZ_BINS)

# Each target for FUZZ_SECONDS, starting from the committed seeds; what it finds
# goes to build/fuzz/corpus-<target>, a crashing input to build/fuzz/crashes/
# (fix the bug, then commit the input under tests/fuzz/corpus/<target>/).
fuzz: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p build/fuzz/corpus-$$t build/fuzz/crashes; \
	  echo "fuzz $$t: $(FUZZ_SECONDS) s"; \
	  ./build/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 \
	    -print_final_stats=1 -artifact_prefix=build/fuzz/crashes/$$t- \
	    build/fuzz/corpus-$$t tests/fuzz/corpus/$$t 2>build/fuzz/$$t.log || \
	    { tail -60 build/fuzz/$$t.log; exit 1; }; \
	  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" build/fuzz/$$t.log | tr '\n' ' '; echo; \
	done

fuzz-ci:
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(FUZZ_CI_SECONDS)

# Rewrite the seed corpora from the current encoders (then commit them).
fuzz-corpus: $(GEN)/splitlearn_comm.pb-c.c
	@mkdir -p build
	$(CC) $(CFLAGS_C) -Itests/fuzz $(shell pkg-config --cflags $(PKGS)) -o build/gen_corpus \
	  tests/fuzz/gen_corpus.c $(CORE_SRC) $(GEN)/splitlearn_comm.pb-c.c $(GEN)/health.pb-c.c \
	  $(shell pkg-config --libs $(PKGS)) -lpthread -lm
	./build/gen_corpus tests/fuzz/corpus

clean:
	rm -rf build dist splitlearn_comm/*.so *.egg-info
