"""``cpet serve``: many task adapters on one compressed base behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import math
import os
import socket
from pathlib import Path


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a timeout of 0, a negative one or ``inf`` has no meaning)."""
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0 (a finite number of seconds), got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0..65535 (0: any free port; ``cpet serve`` prints the one it bound)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value} (0: any free port)")
    return value


def build_app(args: argparse.Namespace):
    """The application ``cpet serve`` runs (separate from starting uvicorn, for tests).

    Raises:
        ValueError: a bad limit or path, or an adapter that does not load; the limits are checked before the
            base loads.
    """
    from ..compress import CompressedBase
    from ..serve.engine import Engine
    from ..serve.registry import check_served_name
    from ..serve.server import ServerLimits, create_app

    limits = ServerLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                          max_queue=args.max_queue, max_batch=args.max_batch, timeout_s=args.timeout)
    if getattr(args, "dtype", "auto") != "auto":  # the runtime group gives every model command --dtype
        raise ValueError(f"--dtype {args.dtype}: cpet serve runs the base in the dtype it was saved in (the one its "
                         "adapters were tuned against): leave --dtype out, or compress the base with that --dtype")
    if args.max_adapters < 1:
        raise ValueError(f"--max-adapters must be >= 1, got {args.max_adapters}: it is how many adapters stay "
                         "loaded")
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
        try:  # checked now: the base loads next
            check_served_name(name)
        except ValueError as exc:
            raise ValueError(f"--adapter {spec}: {exc}") from None
        if not (Path(path) / "adapter_config.json").is_file():  # checked now: the base loads next
            raise ValueError(f"--adapter {spec}: {path} is not an adapter directory (no adapter_config.json)")
        if name == args.served_name:  # requests naming it would reach the bare base, never this adapter
            raise ValueError(f"--adapter {spec}: {name!r} is the bare base's served name (--served-name); give the "
                             "adapter another name")
        if name in dict(adapters):
            raise ValueError(f"--adapter {spec}: {name!r} is given twice; give each adapter its own name")
        adapters.append((name, path))
    if len(adapters) > args.max_adapters:  # each is pinned: the registry could not hold them all
        raise ValueError(f"{len(adapters)} --adapter flags but --max-adapters {args.max_adapters}: the adapters given "
                         "at start stay loaded, so raise --max-adapters to at least their number")
    root = args.adapter_root or (str(pipeline / "adapters") if pipeline else None)
    api_key = args.api_key or os.environ.get("CPET_API_KEY")
    if api_key and root is None:  # runtime loads would read any directory the server can reach
        raise ValueError(f"{args.base} is a bare base, so there is no pipeline adapters/ to confine runtime adapter "
                         "loads to: give --adapter-root DIR (loads must lie inside it), or serve the pipeline "
                         "directory, or leave the API key out (no runtime loads)")
    runtime = getattr(args, "runtime", None)  # --device resolved by the CLI (auto: CUDA when there is one)
    base = CompressedBase.load(base_dir, device=runtime.device if runtime is not None else "cpu")
    engine = Engine(base.model, base.base_id, base.tokenizer, shared_recovery=recovery, capacity=args.max_adapters,
                    root=root)
    for name, path in adapters:  # the operator's own adapters: not confined to the root
        engine.registry.load(name, path, pin=True) if root is None else _load_unconfined(engine, name, path)
    return create_app(engine, served_name=args.served_name, api_key=api_key, limits=limits)


def _load_unconfined(engine, name: str, path: str) -> None:
    root, engine.registry.root = engine.registry.root, None
    try:
        engine.registry.load(name, path, pin=True)
    finally:
        engine.registry.root = root


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (as uvicorn binds one: IPv6 when the host has a colon, SO_REUSEADDR).

    Raises:
        ValueError: the address cannot be bound (in use, not this machine's, an unknown host name).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port (0: any "
                         "free one), stop what listens there, or check --host") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Bind the port (before the model loads, so a busy port fails at once), build the app, say where it is
    served, then serve until stopped."""
    import uvicorn

    sock = _bind(args.host, args.port)
    try:
        app = build_app(args)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {args.base} on http://{host}:{sock.getsockname()[1]} (model names: {args.served_name}, "
              f"{', '.join(app.state.engine.registry.names()) or 'no adapters yet'})", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1  # not started: uvicorn has logged why (the app's startup failed)


def add_serve_parser(sub, command) -> None:
    from . import positive_int  # here: the package imports this module before it defines positive_int

    p = command(sub, "serve", "serve task adapters on one compressed base over an OpenAI-compatible HTTP API",
                cmd_serve)
    p.add_argument("--base", required=True, help="pipeline directory (its base/ and recovery/) or a base directory")
    p.add_argument("--adapter", action="append", help="NAME=DIR, repeatable: adapters loaded at start (pinned); "
                                                   "none: the base alone until a request loads one")
    p.add_argument("--recovery", help="shared recovery directory; None: the pipeline's recovery/")
    p.add_argument("--adapter-root", help="runtime loads must lie inside this directory; None: the pipeline's "
                                          "adapters/ (a bare --base with an API key needs it)")
    p.add_argument("--api-key", help="bearer token for runtime adapter load/unload (or CPET_API_KEY; none: off)")
    p.add_argument("--served-name", default="cpet-base", help="the model name of the bare base")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument("--max-adapters", type=positive_int, default=64,
                   help="adapters kept loaded (LRU eviction of unpinned)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=1024,
                   help="longest completion or chat prompt accepted; a longer one is answered 400 (texts to "
                        "classify are cut to their adapter's own recorded limit instead, the text losing its end)")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="the most tokens one request may generate")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="waiting requests beyond which the server answers 429")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds before a request is answered 504")
