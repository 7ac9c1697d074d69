"""`imatch <command>`: every workflow stage as a command usable on its own."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading

from imatch import (__version__, ablation, augment, backbone, baseline, bundle, config_checks, config_docs, cost,
                    demo_data, download, ensemble, evaluate, ingest, instructions, integrity, plots, predict,
                    pretrain_corpus, pretrain_tiny, provenance, pseudo, reproducibility, score, submission, train)
from imatch.archs import ovis2_convert
from imatch.errors import InputError

STAGES = [download, integrity, demo_data, pretrain_corpus, pretrain_tiny, ingest, augment, instructions, backbone, ovis2_convert, train, score, ensemble, pseudo,
          baseline, submission, evaluate, ablation, plots, predict, bundle, provenance, reproducibility, config_checks, cost,
          config_docs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"imatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for stage in STAGES:
        stage.add_parser(sub)
    for command in sub.choices.values():  # keep the modules' docstrings' line breaks in --help
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG)


def _storage_error(exc: OSError) -> bool:
    """Whether `exc` is the storage refusing a write (pyarrow puts the errno only in its message)."""
    return exc.errno in STORAGE_ERRNOS or any(os.strerror(e) in str(exc) for e in STORAGE_ERRNOS)


def _exit_on_sigterm(signum, frame):
    """SIGTERM (`scancel`, Snakemake stopping a job) unwinds like an error: temporary folders and
    files are removed, child processes are stopped, nothing partial is left; exit 128 + signal."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except InputError as exc:
        print(f"imatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not _storage_error(exc):
            raise
        # a full disk or a folder it may not write: the outputs were not replaced (imatch.atomic)
        print(f"imatch {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if code == 0:
        provenance.record(args, argv)  # what the outputs were made from, for `imatch audit`
    return code


if __name__ == "__main__":
    raise SystemExit(main())
