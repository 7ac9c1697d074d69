# The two commands of the README: `make run` (the workflow on the embedded default) and
# `make test` (the whole test suite). Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
STAMP := $(VENV)/.installed

.PHONY: run test report lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES)

test: $(STAMP)
	$(VENV)/bin/pytest

report: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --report report.zip

lint: $(STAMP)
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

clean:
	rm -rf results .snakemake report.zip
