# The whole set-up for a newcomer: `make run` (the node on its defaults) and `make test`.
# Variables (override on the command line, e.g. `make install TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url URL"`):
#   PYTHON          interpreter that creates the virtualenv (Python 3.11)
#   TORCH_SPEC      the torch requirement installed before the project. The default pins the CPU
#                   build available here; an unpinned `torch` pulls several GB of CUDA packages.
#   TORCH_PIP_ARGS  extra pip arguments for torch only (e.g. a CUDA or CPU wheel index on a GPU host)
#   PYTEST_ARGS     extra pytest arguments (e.g. -k rules, -x)
#   CONFIG          config file for `make run`
#   MODEL_STUDIES   synthetic studies generated for `make model` (seeds 1000 ...; the bundled model used 72)
#   OHIF_VERSION    the OHIF viewer (npm package @ohif/app, its built dist/) that tests/test_viewer.py opens

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
CONFIG ?= config/node.yaml
MODEL_STUDIES ?= 72
OHIF_VERSION ?= 3.13.2
OHIF := var/ohif/$(OHIF_VERSION)
SYNTHETIC := var/synthetic/nifti
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install run test lint demo model clean help debian-tools ohif

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv, install torch, then the project with its dev extras

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	# setuptools' one notice about editable installs ("Editable installation ...") is all it would print
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install --quiet -e ".[dev]"
	touch $@

run: install  ## run the node on config/node.yaml (embedded defaults)
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

# each entry is COMMAND:PACKAGE, or FILE:PACKAGE for a package that installs no command (an Orthanc plugin)
debian-tools:
	@missing=""; for t in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb \
	  chromium:chromium npm:npm pdftoppm:poppler-utils pg_ctlcluster:postgresql systemd-analyze:systemd; do \
	  case $${t%%:*} in /*) test -e $${t%%:*} ;; *) command -v $${t%%:*} >/dev/null ;; esac || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing$$missing (run as root or install them: apt-get install$$missing); tests that need them fail"; fi; \
	fi

# The built viewer, fetched by name and version from the npm registry (npm checks the registry's checksum);
# only its dist/ is kept. Skipped when already there.
$(OHIF)/dist/index.html: | debian-tools
	rm -rf $(OHIF) && mkdir -p $(OHIF)
	cd $(OHIF) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	tar -xzf $(OHIF)/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF) --strip-components=1 package/dist
	rm $(OHIF)/ohif-app-$(OHIF_VERSION).tgz

ohif: $(OHIF)/dist/index.html  ## the OHIF viewer for tests/test_viewer.py, in var/ohif/

lint: install  ## ruff and mypy on the whole tree (their settings and exclusions: pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# OHIF_DIST tells tests/test_viewer.py that the viewer must be there (it fails rather than skips)
test: install debian-tools ohif lint  ## install everything the tests need, lint, then run them all
	OHIF_DIST=$(CURDIR)/$(OHIF)/dist $(VENV)/bin/python -m pytest -n auto $(PYTEST_ARGS)

demo: install debian-tools  ## end-to-end demo: two synthetic studies through the node on its defaults
	$(VENV)/bin/dicom-node demo --config $(CONFIG)

$(SYNTHETIC)/.complete-$(MODEL_STUDIES):
	$(VENV)/bin/dicom-node phantom $(SYNTHETIC) --seed 1000 --count $(MODEL_STUDIES) --format nifti --no-distractors
	touch $@

model: install $(SYNTHETIC)/.complete-$(MODEL_STUDIES)  ## reproduce the bundled models and their test figures (models/README.md)
	$(VENV)/bin/dicom-node train --config models/ild-demo.train.yaml --no-progress
	$(VENV)/bin/dicom-node train --config models/baseline-demo.train.yaml --no-progress
	$(VENV)/bin/dicom-node model-card --config models/ild-demo.train.yaml --model models/ild-demo.safetensors \
	  --baseline models/baseline-demo.safetensors --baseline-config models/baseline-demo.train.yaml \
	  --out models/evaluation --no-progress

clean:  ## remove the virtualenv and caches (keeps var/ data)
	rm -rf $(VENV) .pytest_cache build *.egg-info
