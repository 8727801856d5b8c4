"""Run a test function in several gloo processes on the CPU (tensor-parallel tests)."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    dump_after = float(os.environ.get("DIST_TEST_DUMP_S", "0"))
    if dump_after > 0:  # a worker stuck this long prints every thread's stack (GPU sessions)
        import faulthandler

        faulthandler.dump_traceback_later(dump_after, repeat=True)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report the failure to the parent, with its traceback
        result = ("error", traceback.format_exc())
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    from megacpp_mcore.distributed import destroy_process_groups

    destroy_process_groups()


def run_distributed(fn, world_size: int, tmp_path: Path, *args):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results.

    ``fn`` must be a module-level function (it is pickled into spawned processes).
    """
    port = _free_port()
    mp.start_processes(_worker, args=(world_size, port, fn, args, str(tmp_path)),
                       nprocs=world_size, join=True, start_method="spawn")
    results = []
    for rank in range(world_size):
        status, value = pickle.loads(Path(tmp_path, f"{rank}.pkl").read_bytes())
        if status != "ok":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results.append(value)
    return results
