# The two commands of the README: `make run` (the workflow on the embedded default) and
# `make test` (the whole test suite). Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
STAMP := $(VENV)/.installed

.PHONY: run test reliability report lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES)

test: $(STAMP)
	$(VENV)/bin/pytest

# The fault, bad-input, integrity, fuzzing and determinism tests of docs/reliability.md
reliability: $(STAMP)
	$(VENV)/bin/pytest -v -rA tests/test_bad_input.py tests/test_integrity.py tests/test_fuzz.py \
	  tests/test_reproducibility.py tests/test_slurm.py tests/test_provenance.py tests/test_lengths.py \
	  tests/test_config_checks.py tests/test_ingest.py \
	  tests/test_models.py::test_killed_training_resumes_from_its_last_checkpoint \
	  tests/test_models.py::test_a_stale_scratch_folder_is_not_resumed \
	  tests/test_workflow.py::test_a_killed_run_resumes_with_rerun_incomplete_and_ends_like_an_uninterrupted_one \
	  tests/test_workflow.py::test_the_ensemble_predicts_every_image_and_element_key_once

report: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --report report.zip

lint: $(STAMP)
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

clean:
	rm -rf results .snakemake report.zip
