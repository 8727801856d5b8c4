"""A lone process starts torch.distributed by itself, even when the free port it found is
taken before it listens (two test or benchmark processes side by side on one machine)."""

import os
import subprocess
import sys
import textwrap


def test_lone_process_retries_a_port_taken_in_between():
    script = textwrap.dedent("""
        import os, socket
        import torch.distributed as dist
        from megacpp_mcore import distributed

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]  # the first port offered is already listening
        real = distributed.free_port
        distributed.free_port = lambda: ports.pop() if ports else real()
        distributed.init_process_groups(seed=1)
        assert dist.get_world_size() == 1
        assert int(os.environ["MASTER_PORT"]) != taken.getsockname()[1]
        print("ok")
    """)
    env_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in env_keys}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
