"""`ray job submit ... -- python jobs/evaluate.py ARGS`: the same as `dnc evaluate ARGS` on the cluster."""

import sys

from dnc_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
