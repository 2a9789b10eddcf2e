"""`ray job submit ... -- python jobs/pipeline.py ARGS`: the same as `dnc pipeline ARGS` on the cluster."""

import sys

from dnc_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
