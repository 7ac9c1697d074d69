"""Shared fixtures: a small generated data set and a way to run `imatch` commands in-process."""

from __future__ import annotations

import os
import shutil
import sys
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


@pytest.fixture(autouse=True)
def _environment_restored():
    """os.environ as it was before the test, after it. Commands run in-process set ms-swift's image
    budget there (MAX_PIXELS and the like: its templates read them), as the CLI must; left set, it
    changed what later tests of the same process encoded (a 128 px image became 8x8 patches instead
    of 10x10 once test_prefix had run), so a test's result depended on the order tests ran in."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
    # ms-swift copies MAX_PIXELS & co. into qwen_vl_utils at the first Qwen2.5-VL load of a process:
    # undone, so the next test loads with its own budget, as a fresh process (a workflow job) does
    if "qwen_vl_utils.vision_process" in sys.modules:  # (torch is loaded then: no start-up cost)
        from imatch.archs.qwen2_5_vl import forget_image_budget

        forget_image_budget()


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
SLOW_MODULES = {"test_models", "test_slurm", "test_prefix", "test_blocks", "test_performance", "test_cost", "test_ablation",
                "test_reproducibility", "test_scorer", "test_docs"}
SLOW_NAMES = ("swift_sft", "named_by_snakemake")  # a training through `swift sft`; a Snakemake start

# `make test` runs the suite on two pytest-xdist workers: one pytest process keeps one core busy
# on average (most of a test's time is Python start-up, imports and waiting on subprocesses), so two
# share a 2-core machine. Tests are dealt out a module at a time (module fixtures are built once),
# except that the modules whose tests read the finished demo tree (the session fixture `workflow`,
# built once per worker process, ~5 minutes) form one unit on one worker. (xdist's own `loadgroup`
# cannot be used: it renames node ids, which pytest 9 ignores, so its groups are silently lost.)
# The units start longest first: the demo tree, then test_models (model training), then the
# other slow modules, then the unit tests, so that the last minutes of the run are short tests on
# both workers. The SLURM test is the demo tree's first: once SLURM is installed, a Snakemake start
# waits ~10 s whenever the controller is down (tests/test_slurm.py), so the cluster is up for the
# demo tree's many Snakemake calls, and stops with the longest worker, after the other worker's.
TREE_MODULES = ("test_workflow", "test_slurm")
FIRST_UNITS = ("demo tree", "test_models")


def _unit(module: str) -> str:
    return "demo tree" if module in TREE_MODULES else module


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__
        uses_tree = bool(SLOW_FIXTURES & set(getattr(item, "fixturenames", ())))
        if uses_tree and module not in TREE_MODULES:  # it would build a second demo tree on the other worker
            raise pytest.UsageError(f"{item.nodeid} uses the demo tree: put it in one of {TREE_MODULES} "
                                    "or add its module there (tests/conftest.py)")
        if uses_tree or module in SLOW_MODULES or any(name in item.name for name in SLOW_NAMES):
            item.add_marker(pytest.mark.slow)

    def rank(item):
        unit = _unit(item.module.__name__)
        if unit in FIRST_UNITS:
            return FIRST_UNITS.index(unit), "cluster" not in item.fixturenames
        return len(FIRST_UNITS) + (0 if item.get_closest_marker("slow") else 1), False

    items.sort(key=rank)  # stable: collection order within a rank


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` with the demo tree's modules as one unit."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class DemoTreeTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(Path(nodeid.split("::", 1)[0]).stem)

    return DemoTreeTogether(config, log)
