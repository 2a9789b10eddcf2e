"""`ray job submit ... -- python jobs/study.py ARGS`: the same as `dnc study ARGS` on the cluster."""

import sys

from dnc_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
