"""``fl-server --config server.yaml``: validate the config, then serve on uvloop."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvloop

from common.config import ServerConfig
from common.config_load import load_config
from common.errors import FLError
from common.logs import setup_logging
from common.tls import server_context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-server", description="Federated learning server.")
    parser.add_argument("--config", type=Path, required=True, help="server YAML file")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, ServerConfig)
        if cfg.tls is not None:
            server_context(cfg.tls)  # unreadable or mismatched files: say so now
    except FLError as err:
        print(f"fl-server: {err.message}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, args.log_format, role="server")
    from fl_server.app import serve

    try:
        return uvloop.run(serve(cfg))  # 1 when the job loops failed (logged)
    except FLError as err:
        print(f"fl-server: {err.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fl-server: cannot serve on {cfg.host}:{cfg.port}: {exc.strerror}", file=sys.stderr)
        return 1
