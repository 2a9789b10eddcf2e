"""`ray job submit ... -- python jobs/distill.py ARGS`: the same as `dnc distill ARGS` on the cluster."""

import sys

from dnc_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
