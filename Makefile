# Two commands for a fresh machine: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := clang llvm libbpf-dev bpftool netsniff-ng nftables iproute2 bird2 iputils-ping libxdp1 xdp-tools
# Only `make bench` needs these: the end-to-end comparison's servers, peers and load generators.
BENCH_DEB_PACKAGES := haproxy nginx iperf3 wrk
BPF_SRC := $(wildcard src/rusty_rail/bpf/*.c)
BPF_OBJ := $(BPF_SRC:.c=.o)

.PHONY: venv deb bpf demo test bench clean

venv: $(VENV)/.installed bpf

# Debian packages are installed only when running as root and something is missing.
deb:
	@missing=""; for p in $(DEB_PACKAGES) $(EXTRA_DEB); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	  else echo "missing Debian packages (run as root to install):$$missing"; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	$(MAKE) deb
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

bpf: $(BPF_OBJ)

# make decides what is stale; the clang flags are written only in build.py (stdlib only: no venv needed).
src/rusty_rail/bpf/%.o: src/rusty_rail/bpf/%.c $(wildcard src/rusty_rail/bpf/*.h) src/rusty_rail/bpf/build.py
	PYTHONPATH=src $(PYTHON) -m rusty_rail.bpf.build --force $*

demo: venv
	$(VENV)/bin/rusty-rail demo

test: venv
	$(PY) -m pytest -q

# One command for docs/BENCHMARKS.md and its plots (docs/bench/); the last line is a JSON of every figure.
bench: venv
	$(MAKE) deb EXTRA_DEB="$(BENCH_DEB_PACKAGES)"
	$(PY) -m pip install -q -e '.[test,bench]'
	$(VENV)/bin/rusty-rail bench --out docs

clean:
	rm -rf $(VENV) $(BPF_OBJ) build *.egg-info src/*.egg-info
