"""train_gpt.py under torchrun with one rank (SLOW_RANK, default 1) made slow on purpose before its clock starts (as a
slower compile would), and every rank's final weights saved as CHECKPOINT_DIR/rank<R>.pt, for tests/test_cuda_path.py.
Run with the repository root on PYTHONPATH."""

import os
import sys
import time

import torch

import train_gpt as tg

RANK = int(os.environ.get("RANK", "0"))
SLOW_RANK = int(os.environ.get("SLOW_RANK", "1"))
plain_warmup, plain_save = tg.compile_warmup, tg.save_final_checkpoint


def slow_warmup(*args, **kwargs):
    if RANK == SLOW_RANK:
        time.sleep(float(os.environ.get("SLOW_RANK_SECONDS", "1.5")))
    return plain_warmup(*args, **kwargs)


def save_on_every_rank(model, hp, *args, **kwargs):
    torch.save(model.state_dict(), os.path.join(hp.checkpoint_dir, f"rank{RANK}.pt"))
    return plain_save(model, hp, *args, **kwargs)


tg.compile_warmup, tg.save_final_checkpoint = slow_warmup, save_on_every_rank
sys.exit(tg.main())
