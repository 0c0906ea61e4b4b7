"""Train a Loom model.

    torchrun --nproc-per-node N launch/train.py --config launch/configs/tiny_dense.yaml [a.b=value ...]

The config is read and validated before any process group is built, so a bad key fails fast
with a message that names it.
"""
from __future__ import annotations

import argparse
import os
import sys

from loom import cli
import loom.faults as faults
from loom.config import load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config file (none: defaults, e.g. with model.pretrained)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


@cli.entry
def main(argv=None) -> int:
    """Config, input and data errors (a bad key, checkpoint or sample) end in one line and exit 2 (loom.cli)."""
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = load_config(args.config, args.overrides + faults.config_overrides(rank))
    from loom.train.init_from import resolve_pretrained  # model.pretrained: DIR's model section

    resolve_pretrained(cfg)
    cfg.validate(world_size)

    import torch.distributed as dist

    from loom.parallel.mesh import default_timeout, init_distributed
    from loom.parallel.watch import CollectiveError
    from loom.train.preflight import PreflightError
    from loom.train.trainer import Trainer, build_groups

    # An absent device fails here, before any group exists.
    init_distributed(default_timeout(cfg.runtime.collective_timeout_s), device=cfg.runtime.device)
    try:
        groups = build_groups(cfg)
        trainer = Trainer(cfg, groups)
        history = trainer.fit()
        if groups.rank == 0 and history:
            print(f"done: loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} "
                  f"over {len(history)} steps; metrics in {cfg.train.run_dir}/metrics.jsonl", flush=True)
    except (PreflightError, CollectiveError, FloatingPointError) as e:  # the message says what and where
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
