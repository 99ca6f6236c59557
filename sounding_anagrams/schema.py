"""JSON Schemas of the study file and the render config, so editors complete and check them.

``make schema`` writes them; the tests fail when a shipped schema is not what the models give. Each study and
config names its schema on its first line (``# yaml-language-server: $schema=study.schema.json``), which the
YAML language server (VS Code's YAML extension, Neovim, Helix, ...) reads.

    python -m sounding_anagrams.schema           # write studies/study.schema.json, configs/config.schema.json
    python -m sounding_anagrams.schema --check   # exit 1 when a shipped schema is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.search.study import study_json_schema

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Where each schema lives, relative to the repository root, next to the files it describes.
SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {
    "studies/study.schema.json": study_json_schema,
    "configs/config.schema.json": RenderConfig.model_json_schema,
}


def schema_text(make_schema: Callable[[], dict[str, Any]]) -> str:
    """A JSON Schema as the shipped file holds it (stable key order, a final newline)."""
    schema = {"$schema": JSON_SCHEMA_DIALECT, **make_schema()}
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def stale_schemas(root: Path) -> list[str]:
    """The shipped schemas under ``root`` that are missing or differ from what the models give."""
    stale = []
    for relative, model in SCHEMAS.items():
        path = root / relative
        if not path.is_file() or path.read_text(encoding="utf-8") != schema_text(model):
            stale.append(relative)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sounding_anagrams.schema", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository root (default: here)")
    parser.add_argument("--check", action="store_true", help="only say which schemas are out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_schemas(args.root)
        for relative in stale:
            print(f"{relative} is out of date: run `make schema`", file=sys.stderr)
        return 1 if stale else 0
    for relative, model in SCHEMAS.items():
        path = args.root / relative
        path.write_text(schema_text(model), encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
