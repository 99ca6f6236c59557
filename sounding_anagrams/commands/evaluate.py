"""``evaluate``: CLIP and CLAP scores of render folders, with a table across them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sounding_anagrams.commands.common import quiet_libraries
from sounding_anagrams.errors import ConfigError


def expand_render_folders(folders: Sequence[Path]) -> list[Path]:
    """A folder without config.yaml but with render folders inside stands for those folders."""
    expanded: list[Path] = []
    for folder in folders:
        inner = sorted(p.parent for p in folder.glob("*/config.yaml")) if folder.is_dir() else []
        expanded.extend(inner if inner and not (folder / "config.yaml").exists() else [folder])
    return expanded


def run_evaluate(args: argparse.Namespace) -> int:
    missing = [str(folder) for folder in args.folders if not Path(folder).is_dir()]
    if missing:  # said before the scorers load (seconds, or a download)
        raise ConfigError(
            "folders", missing[0], "not a folder: give render folders (with config.yaml) or folders of them"
        )
    from sounding_anagrams.devices import resolve_device

    resolve_device(args.device, field="--device")  # before the judges load (seconds, or a download)
    from sounding_anagrams.evaluation.evaluate import Scorers, evaluate_folders, format_table

    quiet_libraries()
    scorers = Scorers.load(
        models=args.models,
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
        clap_model=args.clap_model,
        protocol=args.protocol,
        device=args.device,
    )
    results = evaluate_folders(expand_render_folders(args.folders), scorers)
    print(format_table(results))
    failed = [r for r in results if r.error]
    for result in failed:
        print(f"error: {result.error}", file=sys.stderr)
    if failed and len(failed) == len(results):
        return 2
    return 1 if failed else 0
