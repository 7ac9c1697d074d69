"""ms-swift plug-in: its log says what happens about remote code.

ms-swift reads every model's config with `trust_remote_code=True` and warns "Loading model from
DIR with trust_remote_code=True. This will execute custom Python code shipped in the model
repository" for each (and "Loading config / tokenizer/processor from DIR ..." for the loaders that
default to remote code, as Qwen2.5-VL's). The workflow's backbones are native transformers classes: their config.json
names no custom code (`auto_map`), so nothing remote can run, and the warning made every log claim
otherwise. This filter replaces it, for such folders only, by what happens; a folder that does ship
code keeps ms-swift's warning. Loaded by `imatch train` (`--external_plugins`) and `imatch score-set`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

CLAIM = re.compile(r"Loading (?P<what>model|config|tokenizer/processor) from '(?P<dir>[^']+)' "
                   r"with trust_remote_code=True\.")


CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def ships_code(model_dir: str) -> bool:
    """Whether any of the folder's configs points transformers at code of its own (`auto_map`)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return True  # unknown: keep the warning
    if config.get("auto_map"):
        return True
    for name in CONFIGS[1:]:
        try:
            if json.loads((Path(model_dir) / name).read_text()).get("auto_map"):
                return True
        except FileNotFoundError:
            continue
        except (OSError, ValueError, AttributeError):
            return True
    return False


class RemoteCodeTruth(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        found = CLAIM.match(record.getMessage())
        if found and not ships_code(found["dir"]):
            record.msg, record.args = (f"Loading the {found['what']} of {found['dir']!r}: it names no "
                                       "custom code (no auto_map in its configs), so no remote code runs"), ()
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install() -> None:
    logger = logging.getLogger("swift")
    if not any(isinstance(f, RemoteCodeTruth) for f in logger.filters):
        logger.addFilter(RemoteCodeTruth())


install()
