r"""Train a seg model on Ray Train (see `imgxlate train seg --help`).

Locally (starts Ray in this process, 2 workers with gloo):

    python jobs/train_seg.py carvana/ --stages 128:2:frozen,128:2,256:2 --name cars --storage runs

On a Ray cluster (checkpoints in object storage; submitting the same command again follows or resumes the
run instead of duplicating it; credentials come from the nodes' environment or instance role):

    python jobs/submit.py --address http://HEAD:8265 -- \
        python jobs/train_seg.py s3://data/carvana --stages 128:2:frozen,128:4,256:4,512:4 \
        --name cars --storage s3://runs --workers 8 --gpu

or with Ray's own CLI (no idempotent submission id):

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train_seg.py s3://data/carvana --stages 128:2:frozen,128:4,256:4,512:4 \
        --name cars --storage s3://runs --workers 8 --gpu
"""

import sys

from imgxlate.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "seg", *sys.argv[1:]]))
