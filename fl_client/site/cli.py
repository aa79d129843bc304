"""``fl-client --config client.yaml``: validate the config, then run the daemon on uvloop."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvloop

from common import logctx
from common.config import ClientConfig
from common.config_load import load_config
from common.errors import FLError
from common.logs import setup_logging
from common.tls import client_context


async def _run(cfg: ClientConfig) -> None:
    from fl_client.site.service import run_service

    await run_service(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-client", description="Federated learning client.")
    parser.add_argument("--config", type=Path, required=True, help="client YAML file")
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, ClientConfig)
        if cfg.tls is not None:
            client_context(cfg.tls)  # unreadable or mismatched files: say so now
    except FLError as err:
        print(f"fl-client: {err.message}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, args.log_format, role=f"client {cfg.name}")
    logctx.bind(client=cfg.name)
    if cfg.tls is None:
        # INFO, not WARNING: the server, which decides, warns; a demo site stays quiet.
        logging.getLogger("fl_client").info(
            "TLS is off: models and updates cross the network as plain HTTP, and the "
            "server cannot tell this site from another (loopback demos only)"
        )
    try:
        uvloop.run(_run(cfg))
    except FLError as err:  # e.g. StorageError: the workspace cannot be created
        print(f"fl-client: {err.message}", file=sys.stderr)
        return 1
    return 0
