# splitlearn-comm: build, test, demo, sanitizers, benchmarks.
#
#   make demo    set everything up, then run a server hosting a torch model and a client
#   make test    set everything up, then run the C tests and the whole pytest suite
#   make asan    the same tests against an ASan+UBSan build of the extension
#   make bench   the benchmarks (write benchmarks/results.md, its data and its figures)
#   make dashboard-screenshot   regenerate docs/images/dashboard*.png (headless Chromium)
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

.PHONY: all deps venv install build ctest pytest test demo asan asan-ctest asan-pytest bench \
        bench-figures dashboard-screenshot clean

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

ctest: deps $(CTESTS)
	@set -e; for t in $(CTESTS); do ASAN_OPTIONS=detect_leaks=1 ./$$t; done

pytest: install
	$(PY) -m pytest -q tests

test: ctest pytest

demo: install
	$(PY) examples/demo.py

# The extension built with ASan+UBSan into build/asan, then the C tests and the
# Python suite against it with the sanitizer runtime preloaded. Leak detection is
# on for the C tests; off for Python, where CPython and PyTorch keep memory
# until exit by design.
ASAN_LIB = $(shell $(CC) -print-file-name=libasan.so)
UBSAN_LIB = $(shell $(CC) -print-file-name=libubsan.so)
asan: ctest asan-pytest

asan-pytest: install
	rm -rf build/asan && mkdir -p build/asan
	SPLITLEARN_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-tmp --force
	cp splitlearn_comm/*.py splitlearn_comm/*.html splitlearn_comm/py.typed build/asan/splitlearn_comm/
	LD_PRELOAD="$(ASAN_LIB) $(UBSAN_LIB)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 SPLITLEARN_TEST_SANITIZED=1 \
	  PYTHONPATH=$(CURDIR)/build/asan $(PY) -P -m pytest -q -p no:cacheprovider tests

bench: install
	$(PY) benchmarks/bench_roundtrip.py
	$(PY) benchmarks/bench_codecs.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_async.py
	$(PY) benchmarks/bench_sessions.py
	$(PY) benchmarks/bench_replicas.py
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

clean:
	rm -rf build splitlearn_comm/*.so *.egg-info
