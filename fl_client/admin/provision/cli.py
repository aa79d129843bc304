"""``fl-provision PROJECT.yaml -o DIR``: the project's CA and every participant's folder.

Prints one line per CA and participant (created, kept, or completed: a key that was
written before an interrupted run got its certificate). Errors are one
``fl-provision: <message>`` line, exit 2 for an invalid project file or an existing file
that cannot be kept, 1 for anything else.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from common.config_load import load_config
from common.errors import ConfigError, FLError
from fl_client.admin.provision.layout import CA_DIR, CA_KEY
from fl_client.admin.provision.project import Project
from fl_client.admin.provision.store import Outcome, provision

PROG = "fl-provision"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Create the project CA and, for the server, each site and each admin, a folder "
            "with its certificate, key, the CA certificate and a ready config. Running it "
            "again adds new participants and keeps everything that exists."
        ),
    )
    parser.add_argument("project", metavar="PROJECT.yaml", type=Path, help="project file")
    parser.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        type=Path,
        help="output directory (default: ./<project name>)",
    )
    return parser


def report(outcomes: list[Outcome], out: Path) -> str:
    width = max(len(o.name) for o in outcomes)
    lines = [f"{o.role:<6}  {o.name:<{width}}  {o.action:<9}  {o.folder}/" for o in outcomes]
    lines.append(
        f"keep {out / CA_DIR / CA_KEY} offline: whoever holds it can admit anyone; give each "
        "folder to its owner only"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        project = load_config(args.project, Project)
        out = args.output if args.output is not None else Path(project.name)
        outcomes = provision(project, out, now=datetime.now(UTC))
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except FLError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    print(report(outcomes, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
