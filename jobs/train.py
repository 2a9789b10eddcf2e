"""`ray job submit ... -- python jobs/train.py ARGS`: the same as `dnc train ARGS` on the cluster."""

import sys

from dnc_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
