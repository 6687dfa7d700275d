"""Train a sr model on Ray Train (see `imgxlate train sr --help`).

Locally (starts Ray in this process, 2 workers with gloo):

    python jobs/train_sr.py DATA --name my-sr --storage runs --workers 2

On a Ray cluster (checkpoints in object storage; resubmitting the same name resumes):

    ray job submit --working-dir . \
        --runtime-env-json '{"pip": ["-e ."], "excludes": [".git", ".venv", "out", "runs"]}' \
        -- python jobs/train_sr.py s3://data/train --name my-sr \
        --storage s3://runs --workers 8 --gpu --ray-address auto
"""

import sys

from imgxlate.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "sr", *sys.argv[1:]]))
