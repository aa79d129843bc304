"""Benchmark: the reference job's shape (64 tensors x K MiB, 2 clients, 3 rounds) as real
processes on loopback, at two model sizes and once more inside a memory cgroup.

    python -m tests.bench                        # 128 MiB and 4 GiB models, 1 GiB cgroup
    python -m tests.bench --tensor-mib 2 --tensor-mib 16 --cgroup-mib 512
    python -m tests.bench --tls off              # no extra run over mutual TLS
    python -m tests.bench --dtype float16 --dtype bfloat16  # float16, one bf16 run

Prints one JSON line per job run, then one summary line with the targets. Throughput is
model bytes moved (rounds x clients x 2 directions x model size) per second of the
job's running time, compared with the raw disk-write and loopback rates measured in
the same run on the same workspace disk: read before the first job and after every
job, and the median of those readings counts (the rate of a shared machine's disk moves
a lot from one minute to the next). By default one more run at the largest size has
every daemon talk mutual TLS with a project provisioned for the run, so the two modes
can be compared. The models are float32 (``--dtype``); by default one more run at the
largest size has a bfloat16 model, whose updates the server averages in float64 and
rounds to bfloat16. Every job line names its ``dtype``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.baselines import disk_write_gbps, loopback_gbps
from tests.bench.memcg import MemCgroup
from tests.cluster import Cluster
from tests.rss import RssSampler

MIB = 1024 * 1024
RSS_LIMIT_MIB = 300


def run_job(
    root: Path,
    tensor_mib: int,
    args: argparse.Namespace,
    cgroup: MemCgroup | None,
    tls: bool,
    dtype: str = "float32",
) -> dict[str, Any]:
    cluster = Cluster(
        root,
        segment_mib=args.segment_mib,
        cgroup_procs=cgroup.procs if cgroup else None,
        tls=tls,
    )
    model_bytes = args.tensors * tensor_mib * MIB
    try:
        cluster.start_server()
        for i in range(args.clients):
            cluster.start_client(f"site-{i + 1}")
        procs = {"server": cluster.server, **cluster.clients}
        job = {
            "name": f"bench-{tensor_mib}",
            "num_rounds": args.rounds,
            "min_clients": args.clients,
            "model": {
                "kind": "generated",
                "num_tensors": args.tensors,
                "tensor_mib": tensor_mib,
                "dtype": dtype,
                "init": "normal",
            },
            "trainer": {"name": "add_epsilon", "params": {"epsilon": 0.001}},
        }
        with RssSampler({k: p for k, p in procs.items() if p is not None}) as rss:
            submitted = time.perf_counter()
            job_id = cluster.submit(job)
            cluster.wait_for(
                lambda: cluster.status(job_id)["job"]["state"] != "pending",
                timeout=3600,
                what="initial model ready",
            )
            running = time.perf_counter()
            status = cluster.wait_job(job_id, timeout=3 * 3600)
            done = time.perf_counter()
        moved = args.rounds * args.clients * 2 * model_bytes
        result: dict[str, Any] = {
            "tls": tls,
            "dtype": dtype,
            "model_bytes": model_bytes,
            "tensor_mib": tensor_mib,
            "state": status["job"]["state"],
            "wall_s": round(done - running, 2),
            "prepare_s": round(running - submitted, 2),
            "bytes_moved": moved,
            "throughput_gbps": round(moved / (done - running) / 1e9, 3),
            "peak_rss_mib": {k: round(v / MIB, 1) for k, v in rss.peak.items()},
            "peak_rss_anon_mib": {k: round(v / MIB, 1) for k, v in rss.peak_anon.items()},
        }
        if status["job"]["state"] != "finished":
            result["reason"] = status["job"]["reason"]
        if cgroup is not None:
            result["cgroup"] = cgroup.stats()
        return result
    finally:
        cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tensor-mib",
        type=int,
        action="append",
        help="MiB per tensor; give twice for two sizes (default 2 and 64)",
    )
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segment-mib", type=int, default=32)
    parser.add_argument(
        "--cgroup-mib",
        type=int,
        default=1024,
        help="memory limit for the daemons in the cgroup run (0: skip)",
    )
    parser.add_argument(
        "--tls",
        choices=["off", "on", "both"],
        default="both",
        help=(
            "mutual TLS with a project provisioned for the run: off, on for every run, or "
            "both: the runs in plain HTTP plus one over TLS at the largest size (default)"
        ),
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64", "float16", "bfloat16"],
        action="append",
        help=(
            "element type of the models; the first is that of every run, each further one "
            "adds a run at the largest size (default: float32, plus one bfloat16 run)"
        ),
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where workspaces go (default: the system temp dir)",
    )
    args = parser.parse_args()
    sizes = args.tensor_mib or [2, 64]
    main_dtype, *more_dtypes = args.dtype or ["float32", "bfloat16"]
    base = Path(tempfile.mkdtemp(prefix="fl-bench-", dir=args.workdir))
    results: list[dict[str, Any]] = []
    disk_readings: list[float] = []
    try:
        largest = args.tensors * max(sizes) * MIB
        disk_bytes = min(max(largest, 1024 * MIB), 4096 * MIB)
        disk_readings.append(disk_write_gbps(base, disk_bytes))
        loop = loopback_gbps(4096 * MIB)
        print(
            json.dumps(
                {
                    "raw_disk_write_gbps": round(disk_readings[0], 3),
                    "raw_loopback_gbps": round(loop, 3),
                }
            ),
            flush=True,
        )
        tls_all = args.tls == "on"
        runs: list[tuple[int, bool, bool, str]] = [(s, False, tls_all, main_dtype) for s in sizes]
        if args.cgroup_mib:
            runs.append((max(sizes), True, tls_all, main_dtype))
        if args.tls == "both":
            runs.append((max(sizes), False, True, main_dtype))
        runs += [(max(sizes), False, tls_all, d) for d in more_dtypes]
        for tensor_mib, limited, tls, dtype in runs:
            root = base / (
                f"run-{tensor_mib}{'-cgroup' if limited else ''}{'-tls' if tls else ''}-{dtype}"
            )
            root.mkdir()
            cgroup = None
            if limited:
                try:
                    cgroup = MemCgroup.create(f"fl-bench-{int(time.time())}", args.cgroup_mib * MIB)
                except OSError as exc:
                    print(json.dumps({"cgroup_run": "skipped", "why": str(exc)}), flush=True)
                    continue
            try:
                res = run_job(root, tensor_mib, args, cgroup, tls, dtype)
            finally:
                if cgroup is not None:
                    cgroup.remove()
                shutil.rmtree(root, ignore_errors=True)
            res["raw_loopback_gbps"] = round(loop, 3)
            # the disk again after every run: on a shared machine its rate moves a lot
            # from one minute to the next, so one reading would be luck either way
            disk_readings.append(disk_write_gbps(base, disk_bytes))
            res["raw_disk_write_gbps_after"] = round(disk_readings[-1], 3)
            results.append(res)
            print(json.dumps(res), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    disk = statistics.median(disk_readings)
    print(
        json.dumps({"raw_disk_write_gbps_readings": [round(d, 3) for d in disk_readings]}),
        flush=True,
    )
    for res in results:
        res["throughput_vs_disk"] = round(res["throughput_gbps"] / disk, 3)
    print(json.dumps(summarize(results, disk, main_dtype)), flush=True)


def summarize(
    results: list[dict[str, Any]], disk_gbps: float, main_dtype: str = "float32"
) -> dict[str, Any]:
    """The targets, from the runs of ``main_dtype``; the other dtypes' runs (one each, at
    the largest size) add their throughput under ``throughput_gbps_by_dtype``."""
    others = [r for r in results if r["dtype"] != main_dtype]
    results = [r for r in results if r["dtype"] == main_dtype]
    free = [r for r in results if "cgroup" not in r and not r["tls"]]
    limited = [r for r in results if "cgroup" in r]
    secure = [r for r in results if r["tls"] and "cgroup" not in r]
    out: dict[str, Any] = {"summary": True, "raw_disk_write_gbps_median": round(disk_gbps, 3)}
    if free:
        peaks = [max(r["peak_rss_mib"].values()) for r in free]
        out["max_peak_rss_mib"] = max(peaks)
        out["rss_under_300_mib"] = max(peaks) <= RSS_LIMIT_MIB
        if len(free) >= 2:
            small, big = free[0], free[-1]
            growth = {
                k: round(big["peak_rss_mib"][k] / small["peak_rss_mib"][k] - 1, 3)
                for k in small["peak_rss_mib"]
            }
            out["rss_growth_small_to_large"] = growth
            out["rss_growth_under_10pct"] = all(g < 0.10 for g in growth.values())
        out["throughput_gbps_largest"] = free[-1]["throughput_gbps"]
        out["throughput_vs_disk_largest"] = round(free[-1]["throughput_gbps"] / disk_gbps, 3)
        out["throughput_at_least_half_disk"] = out["throughput_vs_disk_largest"] >= 0.5
    if secure:
        out["tls_throughput_gbps"] = secure[-1]["throughput_gbps"]
        plain = [r for r in free if r["model_bytes"] == secure[-1]["model_bytes"]]
        if plain:
            out["tls_vs_plain"] = round(
                secure[-1]["throughput_gbps"] / plain[-1]["throughput_gbps"], 3
            )
    if limited:
        r = limited[0]
        out["cgroup_job_finished"] = r["state"] == "finished" and r["cgroup"]["oom_kill"] == 0
        out["cgroup_max_usage_mib"] = round(r["cgroup"]["max_usage_bytes"] / MIB, 1)
    if others:
        out["throughput_gbps_by_dtype"] = {
            r["dtype"]: r["throughput_gbps"] for r in [*free[-1:], *others]
        }
    out["all_finished"] = all(r["state"] == "finished" for r in [*results, *others])
    return out


if __name__ == "__main__":
    main()
