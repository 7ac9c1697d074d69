# The two commands of the README: `make run` (the workflow on the embedded default) and
# `make test` (the whole test suite). Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
# pytest-xdist workers of `make test` / `make test-fast` (tests/conftest.py says how tests are grouped).
# Two workers run torch on the same cores: OpenMP's threads sleep instead of spinning while they wait
# (the same results; spinning made a memorisation proof 5x slower beside the demo tree's jobs).
TEST_WORKERS ?= $(CORES)
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder
export OMP_WAIT_POLICY ?= PASSIVE
STAMP := $(VENV)/.installed

.PHONY: run test test-fast reliability report lint clean mutation pretrained

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_PARALLEL)

# The inner loop: the unit tests, without what runs the workflow, SLURM, ms-swift training or the
# benchmark driver (the `slow` marker, tests/conftest.py). CI runs `make test`.
test-fast: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_PARALLEL) -m "not slow" -q

# The fault, bad-input, integrity, fuzzing and determinism tests of docs/reliability.md
reliability: $(STAMP)
	$(VENV)/bin/pytest -v -rA tests/test_bad_input.py tests/test_integrity.py tests/test_fuzz.py \
	  tests/test_reproducibility.py tests/test_slurm.py tests/test_provenance.py tests/test_lengths.py \
	  tests/test_config_checks.py tests/test_ingest.py \
	  tests/test_models.py::test_killed_training_resumes_from_its_last_checkpoint \
	  tests/test_models.py::test_a_stale_scratch_folder_is_not_resumed \
	  tests/test_workflow.py::test_a_killed_run_resumes_with_rerun_incomplete_and_ends_like_an_uninterrupted_one \
	  tests/test_workflow.py::test_the_ensemble_predicts_every_image_and_element_key_once

# The shipped pretrained tiny backbones (pretrained/, `source: pretrained`), regenerated on the CPU:
# the corpus (seed 1, 2000 scenes), then each architecture's pretraining with two threads (the
# bytes depend on the thread count; 49 minutes on 2 cores: Qwen2.5-VL's 151,665-row head makes its
# step 3x slower, so it takes 1500 steps, past the loss plateau the others reach by step 400), each
# packed, and the folder resealed; `git diff --stat pretrained/` then says whether anything changed.
# A held-out check (corpus seed 2) is printed for each.
PRETRAIN_WORK ?= /tmp/imatch-pretrain
pretrained: $(STAMP)
	mkdir -p pretrained
	$(VENV)/bin/imatch pretrain-corpus --out $(PRETRAIN_WORK)/corpus --seed 1 --scenes 2000
	$(VENV)/bin/imatch pretrain-corpus --out $(PRETRAIN_WORK)/heldout --seed 2 --scenes 200
	for spec in internvl:4000 ovis2:4000 qwen2_5_vl:1500; do arch=$${spec%%:*}; \
	  $(VENV)/bin/imatch pretrain-tiny --arch $$arch --steps $${spec#*:} --corpus $(PRETRAIN_WORK)/corpus \
	    --out $(PRETRAIN_WORK)/$$arch --threads 2 --pack pretrained/tiny-$$arch.zip \
	    --eval-corpus $(PRETRAIN_WORK)/heldout --eval-limit 0 || exit 1; \
	done
	$(VENV)/bin/imatch seal pretrained

report: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES) --report report.zip

lint: $(STAMP)
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

# Mutation testing of the pure core with its fast tests (docs/mutation.md). mutmut runs in a staged
# copy (workflow/imatch as src/imatch, the layout it expects), so this checkout is never mutated;
# the report (per-module killed/total, every survivor's diff) goes to docs/mutation-report.txt.
MUTATION_DIR ?= /tmp/imatch-mutation
MUTANTS := 'imatch.levels.*' 'imatch.prompts.*' 'imatch.pseudo.x_pseudo_label__*' \
  $(foreach f,_finite logistic _fit_logistic plcc_official plcc_pred_to_gt element_accuracy _nan_to_none score \
    load_official evaluate evaluate_predictors metrics_table,'imatch.evaluate.x_$(f)__*') \
  $(foreach f,check_range by_model mean_over_models fit_weights element_levels combine,'imatch.ensemble.x_$(f)__*') \
  $(foreach f,_with_augmented _element_levels build_overall build_element _finish to_swift_rows write_set \
    _levels_source,'imatch.instructions.x_$(f)__*') \
  $(foreach f,_split_tables records ground_truth _check_predictions submission,'imatch.submission.x_$(f)__*') \
  $(foreach f,shard_of expected_ids gather,'imatch.score.x_$(f)__*') \
  'imatch.ingest.xǁSkipsǁ*' $(foreach f,load_records split_element_key _is_number _score parse_record parse_file \
    _eval_elements join_labels holdout_prompts,'imatch.ingest.x_$(f)__*')

mutation: $(STAMP)
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)/src
	cp -r workflow/imatch $(MUTATION_DIR)/src/ && cp -r tests pyproject.toml $(MUTATION_DIR)/
	find $(MUTATION_DIR) -name __pycache__ -prune -exec rm -rf {} +
	echo "$$(git rev-parse --short HEAD)$$(git status --porcelain -- workflow/imatch tests | awk '{printf " +%s", $$2}')" \
	  > $(MUTATION_DIR)/commit
	cd $(MUTATION_DIR) && start=$$(date +%s) && { $(abspath $(VENV))/bin/mutmut run $(MUTANTS) > run.log 2>&1 || true; } \
	  && echo $$(( $$(date +%s) - start )) > seconds && $(abspath $(VENV))/bin/mutmut results --all true > results.txt
	cd $(MUTATION_DIR) && { echo "mutmut $$($(abspath $(VENV))/bin/pip show mutmut | sed -n 's/^Version: //p') on $$(cat commit), $$(nproc) cores, mutmut run $$(cat seconds) s"; \
	  grep -v ': not checked$$' results.txt | sed 's/^ *//' | awk -F': ' '{split($$1, n, "."); m = n[2]; t[m]++; s[$$2]++; \
	    if ($$2 == "killed" || $$2 == "timeout") k[m]++} END {printf "%-14s %7s %6s %7s\n", "module", "killed", "total", "score"; fflush(); \
	    for (m in t) printf "%-14s %7d %6d %6.1f%%\n", m, k[m], t[m], 100 * k[m] / t[m] | "sort"; close("sort"); \
	    for (x in s) printf "status %s: %d\n", x, s[x] | "sort"}'; \
	  echo; echo "survivors and other unkilled mutants:"; grep -v ': not checked$$\|: killed$$\|: timeout$$' results.txt | sed 's/^ *//'; \
	  for m in $$(grep -v ': not checked$$\|: killed$$\|: timeout$$' results.txt | sed 's/^ *//; s/:.*//'); do \
	    echo; $(abspath $(VENV))/bin/mutmut show $$m 2>&1; done; } > $(CURDIR)/docs/mutation-report.txt
	head -20 docs/mutation-report.txt

clean:
	rm -rf results .snakemake report.zip
