"""Run a test function in several processes: gloo on the CPU, NCCL on GPUs (one per rank).

Two rules keep a failing rank from hanging the others (which would otherwise wait for it in
a collective until the job's time limit): each rank's GPU is made current *before* the test
function runs, so a tensor created with ``device="cuda"`` lands on the rank's own GPU; and a
rank whose function raises exits at once with status 1, whereupon ``torch.multiprocessing``
terminates the others and ``run_distributed`` reports the failing rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from megacpp_mcore.distributed import free_port


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    if torch.cuda.is_available():  # before fn makes any tensor on "cuda"
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dump_after = float(os.environ.get("DIST_TEST_DUMP_S", "0"))
    if dump_after > 0:  # a worker stuck this long prints every thread's stack (GPU sessions)
        import faulthandler

        faulthandler.dump_traceback_later(dump_after, repeat=True)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report the failure to the parent, with its traceback
        result = ("error", traceback.format_exc())
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    if result[0] != "ok":
        # the other ranks may be blocked in a collective with this one: exit now, and the
        # parent terminates them (tearing down the process groups here could block too)
        os._exit(1)
    from megacpp_mcore.distributed import destroy_process_groups

    destroy_process_groups()


def run_distributed(fn, world_size: int, tmp_path: Path, *args):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results.

    ``fn`` must be a module-level function (it is pickled into spawned processes).
    """
    port = free_port()
    try:
        mp.start_processes(_worker, args=(world_size, port, fn, args, str(tmp_path)),
                           nprocs=world_size, join=True, start_method="spawn")
    except mp.ProcessExitedException as exited:
        failures = [f"rank {rank} failed:\n{value}" for rank, (status, value)
                    in _outcomes(tmp_path, world_size).items() if status != "ok"]
        raise AssertionError("\n".join(failures) or str(exited)) from None
    results = []
    for rank, (status, value) in _outcomes(tmp_path, world_size).items():
        if status != "ok":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results.append(value)
    return results


def _outcomes(tmp_path: Path, world_size: int) -> dict[int, tuple[str, object]]:
    """Each rank's written outcome ("ok"/"error", value); a rank that was terminated before
    writing one is absent."""
    out = {}
    for rank in range(world_size):
        path = Path(tmp_path, f"{rank}.pkl")
        if path.exists():
            out[rank] = pickle.loads(path.read_bytes())
    return out
