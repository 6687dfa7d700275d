"""The batch job: run a model over an image collection, writing outputs and a Parquet manifest.

Locally (starts Ray in this process):

    python jobs/translate.py ./photos ./out --model bicubic --scale 2

On a Ray cluster (credentials come from the nodes' environment or instance role):

    ray job submit --working-dir . --runtime-env-json '{"pip": ["-e ."], "excludes": [".git", ".venv", "out"]}' \
        -- python jobs/translate.py s3://archive/scans s3://archive/restored --model s3://models/sr-x4 \
        --ray-address auto
"""

import argparse
import sys

from imgxlate.cli import add_translate_arguments, cmd_translate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_translate_arguments(parser)
    sys.exit(cmd_translate(parser.parse_args()))
