"""Thin CLI over kdscale.checkpoint.convert.hf_to_mcore (run with --help)."""

import sys

from kdscale.checkpoint.convert.hf_to_mcore import main

if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing Manager: keep the guard
    sys.exit(main())
