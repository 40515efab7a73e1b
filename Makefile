# AutoServe Health. `make run` and `make test` work from a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PACKAGES := libs/events libs/config libs/runtime libs/probes services/prober services/breaker services/detector services/recovery services/reporter services/alerter cli

.PHONY: setup system run test unit integration lint bench clean docs deploy-config image

setup: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt $(addsuffix /pyproject.toml,$(PACKAGES))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt setuptools
	$(BIN)/pip install -q --no-build-isolation -c constraints.txt -r requirements-dev.txt $(addprefix -e ,$(PACKAGES))
	touch $@

# System packages and services the tests and benchmarks need (root, Debian).
system:
	bash scripts/ensure-system.sh

# make run UP_ARGS="--cluster 3": the same demo on a local 3-node JetStream cluster.
run: setup
	$(BIN)/autoserve up --demo -c examples/demo.yaml $(UP_ARGS)

# Three lanes at once, sharing no ports and no state: the unit tests (CPU only, niced), the
# cluster and members tests (3-node NATS clusters and several members of a service on free
# ports; markers `cluster` and `members`, mostly waiting on elections and lease expiries) and
# the other integration tests, which mostly wait on real components. The run takes about the
# longest lane's time. All must pass; the two side logs follow the output.
test: setup system
	$(BIN)/ruff check .
	@mkdir -p .autoserve
	@nice -n 10 $(BIN)/pytest tests/unit -p no:cacheprovider > .autoserve/unit-tests.log 2>&1 & unit=$$!; \
	$(BIN)/pytest tests/integration -m "cluster or members" -p no:cacheprovider > .autoserve/cluster-tests.log 2>&1 & cluster=$$!; \
	$(BIN)/pytest tests/integration -m "not cluster and not members"; integration=$$?; \
	wait $$cluster; clusters=$$?; wait $$unit; units=$$?; \
	echo "---- tests/integration -m \"cluster or members\" (ran beside) ----"; cat .autoserve/cluster-tests.log; \
	echo "---- tests/unit (ran beside) ----"; cat .autoserve/unit-tests.log; \
	test $$integration -eq 0 && test $$clusters -eq 0 && test $$units -eq 0

unit: setup
	$(BIN)/pytest tests/unit

integration: setup system
	$(BIN)/pytest tests/integration

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup system
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .autoserve .pytest_cache .hypothesis bench/.work

# Generated from the code and committed; tests fail when they are stale.
docs: setup
	$(BIN)/python scripts/gen_asyncapi.py

deploy-config: setup
	$(BIN)/python scripts/gen_nats_conf.py

# The image (deploy/Dockerfile), built here without a registry: a Debian base made with
# debootstrap (once; scripts/build-base-image.sh), and the pinned wheels fetched by this
# host's pip into build/wheels/ (the container reaches no package index by itself here:
# HTTPS goes through a proxy only this host trusts). With a registry, see deploy/README.md.
IMAGE      ?= autoserve:dev
BASE_IMAGE ?= autoserve-base:bookworm

image: setup
	bash scripts/build-base-image.sh $(BASE_IMAGE)
	$(BIN)/pip wheel -q --no-build-isolation -c constraints.txt --wheel-dir build/wheels setuptools $(addprefix ./,$(PACKAGES))
	rm -rf build/wheels/autoserve_*.whl $(addsuffix /build,$(PACKAGES))  # ours come from source; setuptools' in-tree build dirs
	docker build --network host --build-arg BASE=$(BASE_IMAGE) -f deploy/Dockerfile -t $(IMAGE) .
