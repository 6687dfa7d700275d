r"""Train a sr model on Ray Train (see `imgxlate train sr --help`).

Locally (starts Ray in this process, 2 workers with gloo):

    python jobs/train_sr.py photos/ --preset tiny --name my-sr --storage runs --workers 2

On a Ray cluster (checkpoints in object storage; submitting the same command again follows or resumes the
run instead of duplicating it; credentials come from the nodes' environment or instance role):

    python jobs/submit.py --address http://HEAD:8265 -- \
        python jobs/train_sr.py s3://data/sr_train --val s3://data/Set5 --preset edsr-baseline \
        --name sr-x2 --storage s3://runs --workers 8 --gpu

or with Ray's own CLI (no idempotent submission id):

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train_sr.py s3://data/sr_train --val s3://data/Set5 --preset edsr-baseline \
        --name sr-x2 --storage s3://runs --workers 8 --gpu
"""

import sys

from imgxlate.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "sr", *sys.argv[1:]]))
