"""`python -m lightmem_exp stage=<stage> model=<model> ...`: run one stage or the whole pipeline."""

from __future__ import annotations

import os

# Before torch loads: busy-waiting OpenMP threads slowed CPU training steps ~20x when other jobs share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lightmem_exp import config  # noqa: F401, E402  (registers the config resolvers before Hydra composes)
from lightmem_exp.config import CONF_DIR, check_argv_secrets  # noqa: E402
from lightmem_exp.errors import LmxError  # noqa: E402

log = logging.getLogger("lightmem_exp")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the requested stage; return its headline metric so sweepers can optimise it."""
    from lightmem_exp.runtime import setup_runtime
    from lightmem_exp.stages import run

    setup_runtime(cfg)
    try:
        result = run(cfg)
    except LmxError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return float(result.headline)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before Hydra starts: it saves the overrides under .hydra/, so a secret typed on the command line would be on disk.
    if problem := check_argv_secrets(sys.argv[1:]):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
