"""Thin CLI over kdscale.checkpoint.convert.mcore_to_hf (run with --help)."""

import sys

from kdscale.checkpoint.convert.mcore_to_hf import main

if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager: keep the guard
    sys.exit(main())
