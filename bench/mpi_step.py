"""Time per synchronized training step (forward + backward) across MPI processes on one machine
(loopback), and the share of it spent inside the layer's two collectives.

    python bench/mpi_step.py                     # 1, 2 and 4 processes; prints a table
    python bench/mpi_step.py --ranks 2,4 --threads 2 --shape 32,64,56,56 --steps 30
    mpiexec -n 4 python bench/mpi_step.py --worker   # one measurement, JSON from rank 0

Every process holds its own batch of `--shape` (NCHW float32, feature axis 1) and runs
`BatchNormalization(axis=1, synchronized=True)` over MPI.COMM_WORLD. A step is the forward call
plus `backward` (outputs reuse preallocated buffers through `out=`), timed between barriers.
Synchronized steps alternate with independent ones (the same layer without `synchronized`), so
both see the same contention for cores and memory bandwidth; their difference is what
synchronizing costs.
"Collectives" is the time the layer spends in its two collectives per step, split into waiting
for the other processes to arrive (a barrier in front of each MPI_Allgather, which the
measurement adds) and the MPI_Allgather itself; "bare allgather" is one MPI_Allgather of the
forward's 3 x C doubles, back to back. Needs mpi4py and an mpiexec of the same MPI
(pip install mpich mpi4py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np


class TimedCommunicator:
    """MPI.COMM_WORLD as the layer's communicator, timing the wait for the other processes and
    the allgather separately."""

    def __init__(self, comm: Any, mpi: Any) -> None:
        self.comm = comm
        self.size = comm.Get_size()
        self.double = mpi.DOUBLE
        self.waiting = 0.0
        self.transfer = 0.0

    def allgather(self, send: np.ndarray, receive: np.ndarray) -> None:
        start = time.perf_counter()
        self.comm.Barrier()
        arrived = time.perf_counter()
        self.comm.Allgather([send, self.double], [receive, self.double])
        self.waiting += arrived - start
        self.transfer += time.perf_counter() - arrived


def worker(shape: tuple[int, ...], steps: int, warmup: int) -> None:
    from mpi4py import MPI

    import batchnorm

    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(comm.Get_rank())
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    timed = TimedCommunicator(comm, MPI)
    synchronized = batchnorm.BatchNormalization(axis=1, synchronized=True, communicator=timed)
    independent = batchnorm.BatchNormalization(axis=1)

    def step_time(layer: Any) -> float:
        comm.Barrier()
        start = time.perf_counter()
        layer(x, training=True, out=y)
        layer.backward(dy, out=dx)
        return time.perf_counter() - start

    step_times, independent_times, waiting_times, transfer_times = [], [], [], []
    for step in range(warmup + steps):
        waiting, transfer = timed.waiting, timed.transfer
        elapsed = step_time(synchronized)
        alone = step_time(independent)
        if step >= warmup:
            step_times.append(elapsed)
            independent_times.append(alone)
            waiting_times.append(timed.waiting - waiting)
            transfer_times.append(timed.transfer - transfer)

    send = np.zeros(3 * shape[1])
    receive = np.empty(comm.Get_size() * send.size)
    comm.Barrier()
    latencies = []
    for _ in range(200):
        start = time.perf_counter()
        comm.Allgather([send, MPI.DOUBLE], [receive, MPI.DOUBLE])
        latencies.append(time.perf_counter() - start)

    mine = {
        "step": float(np.median(step_times)),
        "independent": float(np.median(independent_times)),
        "waiting": float(np.median(waiting_times)),
        "transfer": float(np.median(transfer_times)),
        "allgather": float(np.median(latencies)),
    }
    everyone = comm.gather(mine, root=0)
    if comm.Get_rank() == 0:
        result = {
            "ranks": comm.Get_size(),
            "step_s": max(r["step"] for r in everyone),
            "independent_s": max(r["independent"] for r in everyone),
            "waiting_s": float(np.mean([r["waiting"] for r in everyone])),
            "transfer_s": float(np.mean([r["transfer"] for r in everyone])),
            "share": float(np.mean([(r["waiting"] + r["transfer"]) / r["step"] for r in everyone])),
            "allgather_s": float(np.median([r["allgather"] for r in everyone])),
        }
        print("RESULT " + json.dumps(result), flush=True)


def mpiexec() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "mpiexec"
    found = str(candidate) if candidate.is_file() else shutil.which("mpiexec")
    if found is None:
        sys.exit("mpiexec not found: pip install mpich mpi4py")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="process counts to measure")
    parser.add_argument("--shape", default="32,64,56,56", help="per-process NCHW batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    parser.add_argument("--worker", action="store_true", help="measure (run under mpiexec)")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.worker:
        worker(shape, args.steps, args.warmup)
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--shape", args.shape]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    print(
        f"per-process batch {shape} float32, axis 1; {args.threads} OpenMP thread(s) per "
        f"process; {os.cpu_count()} CPUs; median of {args.steps} steps"
    )
    print(
        f"{'ranks':>5}  {'step (ms)':>9}  {'independent (ms)':>16}  "
        f"{'collectives: waiting (ms)':>25}  {'allgather (us)':>14}  {'share':>6}  "
        f"{'bare allgather (us)':>19}"
    )
    for ranks in (int(r) for r in args.ranks.split(",")):
        run = subprocess.run(
            [mpiexec(), "-n", str(ranks), *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            sys.exit(f"{ranks} processes failed:\n{run.stdout}\n{run.stderr}")
        r = json.loads(lines[0][len("RESULT ") :])
        print(
            f"{ranks:>5}  {r['step_s'] * 1e3:>9.2f}  {r['independent_s'] * 1e3:>16.2f}  "
            f"{r['waiting_s'] * 1e3:>25.3f}  "
            f"{r['transfer_s'] * 1e6:>14.1f}  {r['share']:>6.1%}  {r['allgather_s'] * 1e6:>19.1f}"
        )


if __name__ == "__main__":
    main()
