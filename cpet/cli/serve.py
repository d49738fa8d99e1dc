"""``cpet serve``: many task adapters on one compressed base behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def build_app(args: argparse.Namespace):
    """The application ``cpet serve`` runs (separate from starting uvicorn, for tests)."""
    from ..compress import CompressedBase
    from ..serve.engine import Engine
    from ..serve.server import ServerLimits, create_app

    base_dir = Path(args.base)
    pipeline = base_dir if (base_dir / "base" / "manifest.json").exists() else None
    if pipeline is not None:
        base_dir = pipeline / "base"
    if not (base_dir / "manifest.json").exists():
        raise ValueError(f"{args.base} is neither a CPET pipeline nor a compressed base (no manifest.json)")
    recovery = Path(args.recovery) if args.recovery else (pipeline / "recovery" if pipeline else None)
    if recovery is not None and not (recovery / "recovery.json").exists():
        if args.recovery:
            raise ValueError(f"{args.recovery} holds no recovery modules (no recovery.json)")
        recovery = None
    adapters = []
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
        adapters.append((name, path))
    root = args.adapter_root or (str(pipeline / "adapters") if pipeline else None)
    base = CompressedBase.load(base_dir)
    engine = Engine(base.model, base.base_id, base.tokenizer, shared_recovery=recovery, capacity=args.max_adapters,
                    root=root)
    for name, path in adapters:  # the operator's own adapters: not confined to the root
        engine.registry.load(name, path, pin=True) if root is None else _load_unconfined(engine, name, path)
    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                          max_queue=args.max_queue, max_batch=args.max_batch, timeout_s=args.timeout)
    return create_app(engine, served_name=args.served_name, api_key=args.api_key or os.environ.get("CPET_API_KEY"),
                      limits=limits)


def _load_unconfined(engine, name: str, path: str) -> None:
    root, engine.registry.root = engine.registry.root, None
    try:
        engine.registry.load(name, path, pin=True)
    finally:
        engine.registry.root = root


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    app = build_app(args)
    print(f"serving {args.base} on http://{args.host}:{args.port} (model names: {args.served_name}, "
          f"{', '.join(app.state.engine.registry.names()) or 'no adapters yet'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_serve_parser(sub, command) -> None:
    from . import positive_int  # here: the package imports this module before it defines positive_int

    p = command(sub, "serve", "serve task adapters on one compressed base over an OpenAI-compatible HTTP API",
                cmd_serve)
    p.add_argument("--base", required=True, help="pipeline directory (its base/ and recovery/) or a base directory")
    p.add_argument("--adapter", action="append", help="NAME=DIR, repeatable: adapters loaded at start (pinned)")
    p.add_argument("--recovery", help="shared recovery directory; None: the pipeline's recovery/")
    p.add_argument("--adapter-root", help="runtime loads must lie inside this directory; None: the pipeline's "
                                          "adapters/")
    p.add_argument("--api-key", help="bearer token for runtime adapter load/unload (or CPET_API_KEY; none: off)")
    p.add_argument("--served-name", default="cpet-base", help="the model name of the bare base")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=8000, help="TCP port to listen on")
    p.add_argument("--max-adapters", type=int, default=64, help="adapters kept loaded (LRU eviction of unpinned)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=1024,
                   help="longest prompt accepted; a longer one is answered 400 (classification prompts are "
                        "left-truncated to their adapter's own recorded cut)")
    p.add_argument("--max-tokens", type=int, default=256, help="the most tokens one request may generate")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which the server answers 429")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request is answered 504")
