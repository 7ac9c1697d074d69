"""Shared fixtures: a small generated data set and a way to run `imatch` commands in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imatch import demo_data
from imatch.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train_prompts=16, n_val_prompts=5, n_test_prompts=3, image_size=64)


@pytest.fixture(scope="session")
def demo_zip(tmp_path_factory) -> Path:
    """A small demo source in the HF layout with a split zip (read-only: copy before mutating)."""
    out = tmp_path_factory.mktemp("demo") / "zip"
    demo_data.generate(out, seed=3, layout="zip-parts", n_parts=3, **SMALL)
    return out


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """The same data set with an images/ folder instead of the zip."""
    out = tmp_path_factory.mktemp("demo") / "folder"
    demo_data.generate(out, seed=3, layout="folder", **SMALL)
    return out


@pytest.fixture(scope="module")
def ingested(demo_zip, tmp_path_factory):
    """(samples.parquet, elements.parquet) of the zip demo with every split labelled or listed."""
    from imatch.ingest import ingest

    out = tmp_path_factory.mktemp("ingested")
    ingest(demo_zip, out, holdout_fraction=0.25, seed=0, eval_json=demo_zip / "eval.json",
           final_test=demo_zip / "final_test.json")
    return out / "samples.parquet", out / "elements.parquet"


@pytest.fixture
def source(tmp_path, demo_folder) -> Path:
    """A private, mutable copy of the folder-layout demo source."""
    dest = tmp_path / "source"
    shutil.copytree(demo_folder, dest)
    return dest


@pytest.fixture(scope="session")
def workflow(tmp_path_factory):
    """(workdir, small config) of a private copy of the workflow that has run once on a small demo
    locally; tests may edit the copy's code but must bring its results up to date again."""
    from wfhelpers import copy_workflow, snakemake

    wd, small = copy_workflow(tmp_path_factory.mktemp("wf"))
    snakemake(wd, configs=[small])
    return wd, small


@pytest.fixture
def mirror(tmp_path, monkeypatch, demo_zip):
    """A local hub mirror (the hub boundary's test stand-in) holding the demo as the EvalMuse dataset repo."""
    from imatch import hub

    repo = tmp_path / "mirror" / "datasets" / "DY-Evalab" / "EvalMuse"
    repo.mkdir(parents=True)
    for name in ["train_list.json", "test.json", *[p.name for p in demo_zip.glob("images.zip.part-*")]]:
        (repo / name).write_bytes((demo_zip / name).read_bytes())
    (repo / "prompt_t2i.json").write_text("[]")
    monkeypatch.setenv(hub.MIRROR_ENV, str(tmp_path / "mirror"))
    return repo


@pytest.fixture
def imatch(capsys):
    """Run `imatch ARGS...` in-process; return (exit code, stdout, stderr)."""

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


# `make test-fast` (the inner loop: pytest -m "not slow") leaves out what runs the workflow,
# a SLURM cluster, ms-swift training or the benchmark driver; CI runs everything.
SLOW_FIXTURES = {"workflow", "cluster"}
SLOW_MODULES = {"test_models", "test_slurm", "test_prefix", "test_performance", "test_cost", "test_ablation",
                "test_reproducibility", "test_scorer", "test_docs"}
SLOW_NAMES = ("swift_sft", "named_by_snakemake")  # a training through `swift sft`; a Snakemake start

# `make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`): one pytest process
# keeps one core busy on average (most of a test's time is Python start-up, imports and waiting on
# subprocesses), so two share a 2-core machine. Every test that reads the finished demo tree (the
# session fixture `workflow`, built once per worker process) is in one group, on one worker; the
# other tests are grouped by module, so a module's fixtures are built once. The groups start
# longest first: the demo tree, then test_models (model training), then the other slow modules,
# then the unit tests, so that the last minutes of the run are short tests on both workers (and
# the Snakemake calls of the slow modules run while the SLURM test's cluster is up).
TREE_GROUP = "demo-tree"
FIRST_GROUPS = (TREE_GROUP, "test_models")


def _group(item) -> str:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return TREE_GROUP
    return item.module.__name__


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES
                or any(name in item.name for name in SLOW_NAMES)):
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(_group(item)))

    def rank(item):
        group = _group(item)
        if group in FIRST_GROUPS:
            return FIRST_GROUPS.index(group), "cluster" in item.fixturenames
        return len(FIRST_GROUPS) + (0 if item.get_closest_marker("slow") else 1), False

    items.sort(key=rank)  # stable: collection order within a rank
