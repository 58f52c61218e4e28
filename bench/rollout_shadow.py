"""What a rollout's shadow costs clients: ``python -m bench.rollout_shadow [--model-store DIR]``.

Starts the service as ``make serve`` runs it (its own process, free loopback ports), registers the
served archive a second time as a candidate version (same weights, as many workers), measures the
prediction capacity with closed-loop clients, then paces predictions at ``--load`` (default half)
of it, open loop, through alternating phases: no shadow, then the shadow as ``make rollout`` runs
it (the gateway mirroring ``--shadow-percent`` of the requests to a relay that sends them on to the
candidate, whose workers run at the lowest CPU priority), for each share in turn, ``--rounds``
times. It reports the client p50/p99 of each phase and the ratio of the shadowed p99 to the
unshadowed one per share; PASS when the ratio is within ``P99_TARGET`` for the shipped share
(``serving.rollout.Plan.shadow_percent``).

On a machine with few cores the candidate's workers share the cores with the current version's:
a mirrored request costs a second inference on the same CPUs, which the idle priority gives only
the time the current version leaves. Compare the ratio, not the milliseconds, across machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.feedback_flood import TEXTS, PacedLoad, phase_summary, start_service
from bench.overload import archive_and_cpu
from loadtest.closed_loop import ClosedLoop
from project import ARCHIVE_NAME, MODEL_NAME, MODEL_STORE, PROJECT_ROOT
from serving.client import count_ready
from serving.gateway import apply_routes, rollout_conf
from serving.rollout import Plan, stack_client, stage_candidate
from serving.shadow import ShadowRelay, set_idle

P99_TARGET = 1.05  # shadowed p99 / unshadowed p99 at half load
CANDIDATE = "shadow-bench"


def measure(model_store: Path, workdir: Path, shares: list[float], seconds: float, rounds: int, load: float) -> dict:
    store = workdir / "store"
    store.mkdir()
    shutil.copy2(model_store / ARCHIVE_NAME, store / ARCHIVE_NAME)
    process, url, headers = start_service(store, workdir / "service")
    predictions = f"{url}/predictions/{MODEL_NAME}"
    gateway = workdir / "service" / "gateway"
    try:
        client = stack_client(workdir / "service")
        workers = max(1, count_ready(client.default_version(MODEL_NAME)))
        staged = stage_candidate(store / ARCHIVE_NAME, store, MODEL_NAME, CANDIDATE)
        client.register(staged.name, model_name=MODEL_NAME, initial_workers=workers, synchronous="true")
        (described,) = client.describe(MODEL_NAME, CANDIDATE)
        set_idle([w["pid"] for w in described["workers"]], True)
        relay = ShadowRelay(f"{client.inference_url}/predictions/{MODEL_NAME}/{CANDIDATE}", lambda: client.headers())
        relay.start()
        with ClosedLoop(predictions, headers, TEXTS, 4) as base:
            time.sleep(seconds)
        capacity = base.result.statuses.count(200) / seconds
        row: dict = {
            "capacity_requests_per_s": round(capacity, 1),
            "paced_requests_per_s": round(capacity * load, 1),
            "workers_per_version": workers,
            "shares": {},
        }
        with PacedLoad(predictions, headers, capacity * load) as paced:
            for _ in range(rounds):
                for share in shares:
                    for phase, percent in ((f"off-{share:g}", 0.0), (f"shadow-{share:g}", share)):
                        paced.phase = "settling"
                        routes = rollout_conf(CANDIDATE if percent else None, 0, percent, relay.address)
                        if not apply_routes(gateway, routes, shadow=percent > 0):
                            raise RuntimeError("the gateway did not take the shadow's routes")
                        time.sleep(1)
                        paced.phase = phase
                        time.sleep(seconds)
        for share in shares:
            off, on = phase_summary(paced.samples, f"off-{share:g}"), phase_summary(paced.samples, f"shadow-{share:g}")
            row["shares"][f"{share:g}"] = {
                "unshadowed": off,
                "shadowed": on,
                "p99_ratio": round(on["p99_ms"] / off["p99_ms"], 3),
                "p50_ratio": round(on["p50_ms"] / off["p50_ms"], 3),
            }
        answers = relay.take()
        relay.stop()
        row["mirrored_requests"] = len(answers)
        row["mirrors_answered_200"] = sum(a.status == 200 for a in answers)
        row["mirrors_dropped"] = relay.dropped
    finally:
        process.stop()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    parser.add_argument("--shadow-percent", default="10,25,50", help="shares to measure, comma-separated")
    parser.add_argument("--seconds", type=float, default=15, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", type=float, default=0.5, help="paced predictions, share of capacity")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "rollout_shadow.json")
    args = parser.parse_args(argv)
    shares = [float(s) for s in args.shadow_percent.split(",") if s.strip()]
    cpu = archive_and_cpu(args.model_store)
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(args.model_store.resolve(), Path(tmp), shares, args.seconds, args.rounds, args.load)
    row["cpu"] = cpu.summary()
    shipped = f"{Plan.shadow_percent:g}"
    print(f"capacity {row['capacity_requests_per_s']} req/s; paced {row['paced_requests_per_s']} req/s")
    for share, result in row["shares"].items():
        off, on = result["unshadowed"], result["shadowed"]
        print(
            f"shadow {share}%: p99 {off['p99_ms']} -> {on['p99_ms']} ms (x{result['p99_ratio']}), "
            f"p50 {off['p50_ms']} -> {on['p50_ms']} ms; failed {off['failed']} + {on['failed']}"
        )
    if shipped in row["shares"]:
        row["passed"] = row["shares"][shipped]["p99_ratio"] <= P99_TARGET
        verdict = "PASS" if row["passed"] else "FAIL"
        print(f"{verdict}: shadow {shipped}% p99 ratio {row['shares'][shipped]['p99_ratio']} (target <= {P99_TARGET})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
