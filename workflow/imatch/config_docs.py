"""`imatch config-docs`: the key reference of config/README.md, generated from the config schema.

The schema (workflow/schemas/config.schema.yaml) is the one place where a config key's type,
default and description are written. This command writes all of them, every key path (nested
objects, and `[]` for the entries of a list such as `backbones[]`), into config/README.md between
the lines

    <!-- BEGIN imatch config-docs -->
    <!-- END imatch config-docs -->

and leaves the text around them, written by hand, alone. Defaults are shown as JSON, which is
also valid YAML. The output depends on the schema only (keys in the schema's order), so running
it twice changes nothing. --check writes nothing and exits 1 when the section is not what the
schema gives (tests/test_docs.py runs it): after editing the schema, run `imatch config-docs`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from imatch.atomic import atomic_path
from imatch.errors import InputError

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
README = REPO / "config" / "README.md"
BEGIN = "<!-- BEGIN imatch config-docs -->"
END = "<!-- END imatch config-docs -->"
SECTION = "the key reference (between `<!-- BEGIN/END imatch config-docs -->`)"


def value(v) -> str:
    """A default or enum value as the reference shows it: JSON (valid YAML too), in backticks."""
    return f"`{json.dumps(v, ensure_ascii=False)}`"


def type_of(sub: dict) -> str:
    """What a key accepts, in words: type, allowed values and bounds (e.g. `integer >= 1`)."""
    types = sub.get("type", "any")
    words = " or ".join(types) if isinstance(types, list) else types
    if "enum" in sub:
        words += ", one of " + ", ".join(value(v) for v in sub["enum"])
    if "pattern" in sub:
        words += f" matching `{sub['pattern']}`"
    bounds = [f"{sign} {sub[key]}" for key, sign in
              (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")) if key in sub]
    if bounds:
        words += " " + " and ".join(bounds)
    items = sub.get("items")
    if isinstance(items, dict):
        item = type_of(items)
        words += " of objects" if "properties" in items else f" of ({item})" if "," in item else f" of {item}"
    lo, hi = sub.get("minItems"), sub.get("maxItems")
    if lo is not None and lo == hi:
        words += f", exactly {_items(lo)}"
    else:
        words += f", at least {_items(lo)}" if lo is not None else ""
        words += f", at most {_items(hi)}" if hi is not None else ""
    if sub.get("uniqueItems"):
        words += ", no repeats"
    return words


def _items(n: int) -> str:
    return f"{n} item" + ("" if n == 1 else "s")


def keys(schema: dict, prefix: str = ""):
    """(path, sub-schema, required) of every key under `schema`, depth first in schema order;
    the keys of list entries as `list[].key`."""
    required = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path, sub, name in required
        yield from keys(sub, f"{path}.")
        items = sub.get("items")
        if isinstance(items, dict) and "properties" in items:
            yield from keys(items, f"{path}[].")


def line(path: str, sub: dict, required: bool) -> str:
    facts = [type_of(sub)]
    if required:
        facts.append("required")
    if "default" in sub:
        facts.append(f"default {value(sub['default'])}")
    description = " ".join(sub.get("description", "").split())
    return f"- `{path}` ({'; '.join(facts)})" + (f": {description}" if description else "")


def render(schema: dict, source: str) -> str:
    """The whole generated section, markers included."""
    out = [BEGIN,
           f"<!-- generated from {source} by `imatch config-docs`: edit the schema, then rerun it -->",
           "",
           " ".join(schema.get("description", "").split()),
           "",
           "Each key: what it accepts; whether it is required (keys of a list entry); its default, as JSON"
           " (which is YAML too), taken when the key is left out; what it does. Nested keys are written"
           " as paths, `[]` standing for every entry of a list."]
    for name, sub in schema.get("properties", {}).items():
        out += ["", f"### `{name}`", "", line(name, sub, name in set(schema.get("required", [])))]
        nested = [line(path, s, req) for path, s, req in keys(sub, f"{name}.")]
        items = sub.get("items")
        if isinstance(items, dict) and "properties" in items:
            nested += [line(path, s, req) for path, s, req in keys(items, f"{name}[].")]
        if nested:
            out += [""] + nested
    out += ["", END]
    return "\n".join(out)


def spliced(text: str, section: str, where) -> str:
    """`text` with what lies between its markers (markers included) replaced by `section`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise InputError(where, f"needs exactly one '{BEGIN}' line followed by one '{END}' line")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return head + section + tail


def _run(args) -> int:
    try:
        schema = yaml.safe_load(args.schema.read_text())
        text = args.readme.read_text()
    except FileNotFoundError as exc:
        raise InputError(exc.filename, "not found") from None
    try:
        source = args.schema.resolve().relative_to(REPO).as_posix()
    except ValueError:
        source = args.schema.as_posix()
    new = spliced(text, render(schema, source), args.readme)
    if new == text:
        print(f"{args.readme}: {SECTION} is current")
        return 0
    if args.check:
        print(f"imatch config-docs: {args.readme}: {SECTION} is out of date with {args.schema}; "
              f"run `imatch config-docs` to regenerate it", file=sys.stderr)
        return 1
    with atomic_path(args.readme) as tmp:
        tmp.write_text(new)
    print(f"{args.readme}: {SECTION} regenerated from {args.schema}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("config-docs", help="write config/README.md's key reference from the config schema",
                              description=__doc__)
    p.add_argument("--schema", type=Path, default=SCHEMA, help=f"the config schema (default: {SCHEMA.relative_to(REPO)})")
    p.add_argument("--readme", type=Path, default=README,
                   help=f"the file holding the markers, rewritten in place (default: {README.relative_to(REPO)})")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when the section is not what the schema gives")
    p.set_defaults(func=_run)
