r"""The batch job: run a model over an image collection, writing outputs and a Parquet manifest.

Locally (starts Ray in this process):

    python jobs/translate.py ./photos ./out --model bicubic --scale 2

On a Ray cluster (submitting the same command again follows the running job, or reports it finished,
instead of starting a duplicate; a rerun of the work skips the inputs the manifest has done; credentials
come from the nodes' environment or instance role, never from the command line):

    python jobs/submit.py --address http://HEAD:8265 -- \
        python jobs/translate.py s3://archive/scans s3://archive/restored --model s3://models/sr-x4 \
        --gpus-per-actor 1

or with Ray's own CLI (no idempotent submission id):

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/translate.py s3://archive/scans s3://archive/restored --model s3://models/sr-x4

Inside a Ray job, RAY_ADDRESS is set and the job joins that cluster; elsewhere --ray-address does.
"""

import argparse
import sys

from imgxlate.cli import add_translate_arguments, cmd_translate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_translate_arguments(parser)
    sys.exit(cmd_translate(parser.parse_args()))
