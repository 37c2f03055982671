"""Wall time of the main job: `jfe demo` from scratch, then again on the finished workdir.

    python benchmarks/bench_demo.py [--workdir /tmp/jfe_bench_demo]

Prints one table: the fresh run's stages (from demo_summary.json), its total wall time
including start-up, and the rerun's wall time. Target: the fresh demo within 10 minutes on
2 cores; the rerun well under a minute.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/jfe_bench_demo")
    args = parser.parse_args()
    jfe = os.path.join(os.path.dirname(sys.executable), "jfe")
    fresh, output = timed([jfe, "demo", "--workdir", args.workdir, "--fresh"])
    with open(os.path.join(args.workdir, "demo_summary.json")) as f:
        stages = json.load(f)["seconds"]
    rerun, _ = timed([jfe, "demo", "--workdir", args.workdir])
    print(output)
    print(f"load average: {os.getloadavg()[0]:.1f}  cores: {os.cpu_count()}")
    print(f"{'what':<34}{'seconds':>10}")
    print("-" * 44)
    for stage, seconds in stages.items():
        print(f"{'  stage ' + stage:<34}{seconds:>10}")
    print(f"{'jfe demo --fresh (wall, all)':<34}{fresh:>10.1f}")
    print(f"{'jfe demo again (wall, all skipped)':<34}{rerun:>10.1f}")


if __name__ == "__main__":
    main()
