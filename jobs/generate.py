"""`ray job submit ... -- python jobs/generate.py ARGS`: the same as `dnc generate ARGS` on the cluster."""

import sys

from dnc_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
