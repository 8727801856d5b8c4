#!/usr/bin/env python3
"""Megatron-LM pretraining of a megacpp-mcore hybrid model (run under torchrun).

Usage: torchrun --nproc-per-node N scripts/pretrain_nam.py $(megacpp translate RECIPE
--target plugin --format args) [more Megatron flags, e.g. --save DIR --load DIR]
or simply: megacpp train RECIPE. See megacpp_mcore/launcher.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megacpp_mcore.megatron.launcher import main

if __name__ == "__main__":
    sys.exit(main())
