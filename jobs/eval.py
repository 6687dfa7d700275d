r"""Evaluate a model on held-out data (see `imgxlate eval --help`): sr, seg or style.

Locally:

    python jobs/eval.py sr --model out/models/sr-x2 --data ../shared/data/sr_eval/Set5 --scale 2 --out out/eval/set5
    python jobs/eval.py seg --model runs/cars/model --data ../shared/data/seg/carvana512 --split val --out out/eval/cars
    python jobs/eval.py style --model runs/starry/model --data ../shared/data/style/content --out out/eval/starry

On a Ray cluster (it runs on the head node as the job's driver; models and results can be s3:// URIs):

    python jobs/submit.py --address http://HEAD:8265 -- \
        python jobs/eval.py sr --model s3://runs/sr-x2/model --data /data/Set5 --scale 2 --out s3://reports/sr-x2
"""

import sys

from imgxlate.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
