"""Every ``imgxlate`` command's flags (argparse), apart from what the commands do (imgxlate.cli). A flag's
``dest`` is the name of the config field it sets, so a command builds its config from the parsed arguments
(imgxlate.cli.config_from); jobs/translate.py builds its parser from add_translate_arguments."""

from __future__ import annotations

import argparse
import math

DESCRIPTION = """\
imgxlate: image-to-image models (super-resolution, style transfer, U-Net segmentation)
trained on Ray Train and run over large image collections with Ray Data.

Models are given as the path or URI (s3://...) of a model artifact folder, or as 'bicubic'
(zero parameters, any scale) for the baseline."""


def number(kind: type = int, at_least: float | None = None, above: float | None = None,
           below: float | None = None, at_most: float | None = None):
    """An argparse type: a finite number of ``kind`` within the bounds given; anything else is argparse's usage
    error (one line, exit 2) instead of a traceback or a run that fails later."""
    rules = [f"at least {at_least:g}" if at_least is not None else "", f"more than {above:g}" if above is not None
             else "", f"less than {below:g}" if below is not None else "", f"at most {at_most:g}" if at_most is not
             None else ""]
    want = ("a whole number" if kind is int else "a finite number") + "".join(f", {r}" for r in rules if r)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {want}") from None
        if (not math.isfinite(value) or (at_least is not None and value < at_least)
                or (above is not None and value <= above) or (below is not None and value >= below)
                or (at_most is not None and value > at_most)):
            raise argparse.ArgumentTypeError(f"{text}: give {want}")
        return value

    parse.__name__ = want
    return parse


COUNT, NONNEG = number(int, at_least=1), number(int, at_least=0)
POSITIVE, NONNEG_F, FINITE = number(float, above=0), number(float, at_least=0), number(float)
FRACTION = number(float, at_least=0, below=1)
DEGRADATIONS = ("none", "restore", "denoise", "deblock", "colourise")     # imgxlate.degrade.PRESETS (a test holds it)


# ------------------------------------------------------------------------------------ shared pieces
def add_shared_options(p, *names: str, as_translate: bool = False) -> None:
    """Options that mean the same in several commands, defined once: ``--tile``, ``--overlap``, ``--amp`` and
    ``--compile`` (how the Predictor runs a model: translate and every eval, ``as_translate``) and
    ``--ray-address``."""
    note = ", as translate's" if as_translate else ""
    options = {
        "--tile": dict(type=int, default=None, help=f"tile side in input pixels{note or ' for large images'} "
                                                    f"(default: 256 on CPU, 1024 on GPU)"),
        "--overlap": dict(type=int, default=32, help=f"tile overlap in input pixels{note}"),
        "--ray-address": dict(help="Ray cluster to join (default: RAY_ADDRESS if set, else start Ray locally)"),
        "--amp": dict(default="auto", choices=["auto", "bf16", "fp16", "off"],
                      help=f"precision{note}: auto (default) bf16 where the device runs it natively and the model's "
                           f"measured bf16 cost is within 0.02 dB PSNR / 0.001 Dice, else fp32; bf16; fp16 (GPU); "
                           f"off (fp32). 16-bit inputs always run in fp32"),
        "--compile": dict(action="store_true", help=f"torch.compile the model{note} (a failed compile runs it "
                                                     f"eagerly, with one warning)"),
    }
    for name in names:
        p.add_argument(name, **options[name])


# ----------------------------------------------------------------------------------------- translate
def extension_list(text: str) -> tuple[str, ...]:
    found = tuple(e.strip() for e in text.split(",") if e.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} names no extension (e.g. png,jpg)")
    return found


def add_translate_arguments(p: argparse.ArgumentParser) -> None:
    """The batch job's options (shared by `imgxlate translate` and jobs/translate.py): TranslateConfig's fields."""
    from imgxlate.io import codec, listing

    p.add_argument("src", help="s3://bucket/prefix, a local folder, or a manifest (.parquet/.csv/.txt of URIs)")
    p.add_argument("dst", help="s3://bucket/prefix or a local folder; outputs mirror the source's keys")
    p.add_argument("--model", required=True, help="artifact path/URI, or 'bicubic' (with --scale)")
    p.add_argument("--scale", type=FINITE, default=None,
                   help="upscaling factor for 'bicubic' (default 2); checked for artifacts")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--extensions", type=extension_list, default=",".join(e.lstrip(".") for e in listing.IMAGE_EXTS),
                    help="comma-separated input extensions to take from a listing (default: %(default)s)")
    io.add_argument("--limit", type=int, help="process at most this many inputs (in listing order); with "
                    "--output-format webdataset / parquet, whole shards: the one that reaches it is done whole")
    io.add_argument("--format", default="png", choices=list(codec.FORMATS), help="output format (default png)")
    io.add_argument("--input-format", default="auto", choices=["auto", "files", "webdataset", "parquet"],
                    help="what SRC holds: image files; WebDataset tar shards (each image member one input, keyed "
                         "<tar>/<member>); or Parquet files with a column of image bytes; auto (default): parquet "
                         "with --image-column, webdataset for a .tar or a brace pattern "
                         "(shards/{00000..00099}.tar), files otherwise")
    io.add_argument("--image-column", help="Parquet SRC: the column of encoded image bytes (binary, or a Hugging "
                    "Face Image struct)")
    io.add_argument("--key-column", help="Parquet SRC: the column that names each row (default: its row number)")
    io.add_argument("--output-format", default="files", choices=["files", "webdataset", "parquet"],
                    help="files (default): one object per input; webdataset: one tar per shard (per source tar "
                         "for tar input), the sample's other members beside each output; parquet: one Parquet "
                         "file per shard, the manifest's columns and the output's bytes")
    io.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    io.add_argument("--png-level", type=int, default=None, help="PNG: deflate at this zlib level, 0-9 (default: "
                    "level 1 with zlib's RLE strategy, as OpenCV writes PNG: as small as level 6 on photos and 2-3x "
                    "faster; 6-9 are smaller on flat graphics); the pixels are the same")
    io.add_argument("--suffix", default="", help="added to each output name before the extension, e.g. _x4")
    io.add_argument("--cutout", action="store_true", help="segmentation: write the RGBA cut-out, not the mask")
    io.add_argument("--max-pixels", type=int, default=codec.DEFAULT_MAX_PIXELS,
                    help="inputs with more pixels get a too_large row (default %(default)s)")
    io.add_argument("--s3-endpoint", help="endpoint URL of an S3-compatible store (else AWS_ENDPOINT_URL)")
    rs = p.add_argument_group("resources")
    add_shared_options(rs, "--ray-address")
    rs.add_argument("--num-cpus", type=COUNT, help="logical CPUs when Ray is started locally (default: all)")
    rs.add_argument("--actors", type=int, help="model actors (default: one per GPU; on CPUs, one per "
                    "--cpus-per-actor of the cluster with the fused pipeline, 1 with the split one)")
    rs.add_argument("--max-actors", type=int,
                    help="let the pool of model actors grow to this many as the cluster adds nodes (default: on "
                         "GPUs, as many as the cluster gives, starting with one per GPU there is; on CPUs, a fixed "
                         "pool of --actors)")
    rs.add_argument("--gpus-per-actor", type=FINITE, help="GPUs per model actor (default: 1 if the cluster has GPUs; "
                                                         "0 runs CPU actors on a GPU cluster)")
    rs.add_argument("--cpus-per-actor", type=FINITE, default=1.0, help="CPUs per model actor (default 1)")
    rs.add_argument("--io-cpus", type=FINITE, default=0.25, help="CPUs per read/decode or encode/write task")
    rs.add_argument("--batch-size", type=int, default=8,
                    help="images per model run within an input block (default 8; small images of one size are "
                         "batched up to a pixel budget inside a run)")
    add_shared_options(rs, "--tile", "--overlap", "--amp", "--compile")
    run = p.add_argument_group("run")
    run.add_argument("--dry-run", action="store_true", help="list and count inputs, estimate output size, stop")
    run.add_argument("--fail-on-error", action="store_true", help="exit 1 when any input failed")
    run.add_argument("--lease", choices=("on", "off"), default="on",
                     help="on (default): hold DST/_manifest/LEASE so that two runs never write one DST; needs a store "
                          "that enforces conditional writes (checked). off: no lease, at your risk (the summary "
                          "says so)")
    run.add_argument("--wait-for-lease", type=NONNEG_F, default=0.0, metavar="SECONDS", dest="wait_for_lease_s",
                     help="when another run holds DST, wait up to this long for it (default: stop at once, exit 2)")
    rs.add_argument("--max-model-retries", type=int, default=3,
                    help="retries of a batch whose model actor died; then its inputs get model_error (default 3)")
    run.add_argument("--run-id", help="name for this run's manifest folder: letters, digits, '.', '_', '-' "
                                      "(default: time + random)")
    run.add_argument("--shard-size", type=int, default=10_000,
                     help="inputs per shard, the unit of manifest parts and of resume (default %(default)s)")
    run.add_argument("--queued-inputs", type=int, default=20_000,
                     help="inputs handed to the pipeline ahead of what it has taken (default %(default)s)")
    run.add_argument("--pipeline", choices=["auto", "in-process", "fused", "split"], default="auto",
                     help="in-process: the same stages in this process, without Ray (one model; small inputs a "
                          "block per CPU in threads, larger ones every CPU's threads on one); fused: read, decode, "
                          "model, encode and write in one model-actor call (no task hops; one actor per "
                          "--cpus-per-actor); split: read/decode and encode/write tasks around the actors; auto "
                          "(default): in-process for a small run that joins no cluster (at most 10,000 inputs and "
                          "64 MB of sources, on CPUs), else fused on CPU actors, split on GPU actors")


# ------------------------------------------------------------------------------------------- train
def add_train_arguments(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("data", help="training images: folder, s3:// prefix or manifest" +
                   (" (images with <name>_mask.gif|png masks)" if task == "seg" else ""))
    p.add_argument("--val", help="validation images (default: a seeded 10%% of the training images, held out "
                                 "from training)" if task != "seg" else argparse.SUPPRESS)
    p.add_argument("--name", default=f"{task}-run", help="run name: the same name and storage resume the run")
    p.add_argument("--storage", default="runs", help="checkpoint storage: local folder or s3://bucket/prefix")
    p.add_argument("--out", help="model artifact URI (default: <storage>/<name>/model)")
    p.add_argument("--workers", type=COUNT, default=2, help="Ray Train workers (DDP processes)")
    p.add_argument("--gpu", action="store_true", dest="use_gpu", help="one GPU per worker (NCCL)")
    p.add_argument("--cpus-per-worker", type=POSITIVE,
                   help="CPUs per worker (default 1; with --gpu 4: 3 loader processes decode and crop while the "
                        "main one feeds the GPU)")
    add_shared_options(p, "--ray-address")
    p.add_argument("--wait-for-resources", type=NONNEG_F, default=0, metavar="SECONDS",
                   help="when the cluster cannot hold the workers (e.g. --gpu without GPU nodes), ask its "
                        "autoscaler and wait this long before giving up (default 0: stop at once, exit 2)")
    p.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="how workers are placed on nodes (STRICT_SPREAD: one per node)")
    p.add_argument("--max-failures", type=number(int, at_least=-1), default=2, help="worker failures to recover from")
    p.add_argument("--epochs", type=COUNT, default=5, help="epochs per stage when --stages is not given")
    p.add_argument("--batch-size", type=COUNT, default=16, help="per worker; the LR scales with the global batch")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="peak LR for a global batch of --reference-batch")
    p.add_argument("--reference-batch", type=COUNT, default=16)
    p.add_argument("--weight-decay", type=NONNEG_F, default=1e-4)
    p.add_argument("--warmup", type=FRACTION, default=0.25, dest="warmup_pct", metavar="WARMUP",
                   help="one-cycle warmup fraction")
    p.add_argument("--clip-grad", type=NONNEG_F, default=1.0)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"],
                   help="autocast: bf16 on GPUs and on CPUs with native bf16 (AMX / AVX-512 BF16; fp32 "
                        "elsewhere), fp16 on GPUs only; the losses, Gram matrices and validation stay fp32")
    p.add_argument("--ema", type=FRACTION, default=0.0, help="EMA decay of the weights, e.g. 0.999 (0: off)")
    p.add_argument("--checkpoint-every", type=NONNEG, default=0, help="also checkpoint every N steps")
    p.add_argument("--steps-per-epoch", type=NONNEG, default=0, dest="max_steps_per_epoch", metavar="STEPS_PER_EPOCH",
                   help="cap the steps per epoch (0: all)")
    p.add_argument("--limit", type=COUNT, help="use at most this many training images (seg: image/mask pairs)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples and the held-out split")
    p.add_argument("--cache-mb", type=NONNEG_F, default=1024,
                   help="decoded training images each worker keeps (least recently used first out), in MB")
    p.add_argument("--preset", help="model preset (sr: lesson, edsr-baseline, edsr, tiny)")
    p.add_argument("--init", metavar="MODEL", help="start from this trained model's weights (fine-tuning): a shipped "
                   "model's name (sr-x2, ...) or an artifact path / URI; its architecture and config are the run's, "
                   "except that --model-config's nf / n_blocks grow an SR model wider / deeper, keeping what it "
                   "computes")
    p.add_argument("--model-config", default="{}", help="JSON of model config overrides, e.g. '{\"nf\": 32}'")
    p.add_argument("--vgg-weights", default="imagenet", help="imagenet, a path/URI, or random (tests)")
    {"sr": _add_sr_arguments, "seg": _add_seg_arguments, "style": _add_style_arguments}[task](p)


def _add_sr_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=int, default=None, choices=(1, 2, 4, 8),
                   help="upscaling factor (default: --init's, else 2)")
    p.add_argument("--stages", help="progressive plan scale:epochs[:new], e.g. 2:3,4:1:new,4:3")
    p.add_argument("--hr-crop", type=COUNT, default=96,
                   help="HR crop side (training images smaller than it are skipped, with a warning)")
    p.add_argument("--samples-per-image", type=COUNT, default=8, help="random crops per image per epoch")
    p.add_argument("--loss", default="l1", choices=["l1", "mse", "perceptual"])
    p.add_argument("--degradations", default="none", choices=DEGRADATIONS,
                   help="restoration degradations: none, restore, denoise, deblock, colourise")


def _add_seg_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", help="progressive plan size:epochs[:frozen], e.g. 128:2:frozen,128:2,256:2")
    p.add_argument("--val-fraction", type=number(float, above=0, below=1), default=0.2,
                   help="groups (car ids) held out")
    p.add_argument("--loss", default="bce_dice", choices=["bce", "bce_dice"], dest="seg_loss",
                   help="BCE with logits (the lesson's) or BCE + soft Dice (default)")
    p.add_argument("--encoder-weights", help="none, imagenet (the default without --init), or a path/URI")


def _add_style_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--style-image", required=True, help="the style painting (path or URI)")
    p.add_argument("--content-size", type=COUNT, default=256)
    p.add_argument("--style-size", type=COUNT,
                   help="the style image's shorter side for its Gram targets, resized first (default: the "
                        "content size, as the lesson)")
    p.add_argument("--content-weight", type=NONNEG_F, default=1e4)
    p.add_argument("--samples-per-image", type=COUNT, default=4)
    p.add_argument("--norm", choices=["batch", "instance"], help="default without --init: instance")


# -------------------------------------------------------------------------------------------- parser
def _train_flags(trn: argparse.ArgumentParser) -> None:
    trn_sub = trn.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, text in (("sr", "super-resolution / restoration (EDSR-style)"), ("style", "fast style transfer"),
                       ("seg", "U-Net segmentation")):
        add_train_arguments(trn_sub.add_parser(task, help=text), task)


def _lr_find_flags(lf: argparse.ArgumentParser) -> None:
    lf_sub = lf.add_subparsers(dest="task", metavar="TASK", required=True)
    for task in ("sr", "style", "seg"):
        tp = lf_sub.add_parser(task)
        add_train_arguments(tp, task)
        tp.add_argument("--plot", default="lr_find.png", help="where to write the plot (path or URI)")
        tp.add_argument("--start-lr", type=POSITIVE, default=1e-6)
        tp.add_argument("--end-lr", type=POSITIVE, default=1.0)
        tp.add_argument("--steps", type=COUNT, default=60)


def _eval_sr_flags(sr: argparse.ArgumentParser) -> None:
    sr.add_argument("--scale", type=COUNT, required=True, help="upscaling factor (2, 4, ...)")
    sr.add_argument("--rgb", action="store_true", help="RGB PSNR/SSIM instead of the Y channel")
    sr.add_argument("--ensemble", action="store_true",
                    help="EDSR's 8-way geometric self-ensemble (flips and rotations, averaged; 8x the compute)")
    sr.add_argument("--out", help="folder (path or URI) for per-image CSV/Parquet, summary.json and the sheet PNG")
    sr.add_argument("--degradations", default="none", choices=DEGRADATIONS,
                    help="degrade each LR image as restoration training does (none, restore, denoise, deblock, "
                         "colourise); model and bicubic get the same degraded input")
    sr.add_argument("--seed", type=int, default=0, help="seed of the degradations drawn per image")
    sr.add_argument("--sheet", type=NONNEG, default=6, help="images on the before/after sheet (0: none)")
    sr.add_argument("--crop", type=COUNT, default=160, help="sheet crop side in HR pixels (the most detailed region)")


def _eval_seg_flags(sg: argparse.ArgumentParser) -> None:
    sg.add_argument("--split", choices=["all", "val", "train"], default="all",
                    help="'val': only the groups (cars) the training run held out (its seed and fraction)")
    sg.add_argument("--size", type=COUNT,
                    help="override the contract's input size (default: the last training stage's)")
    sg.add_argument("--worst", type=NONNEG, default=8, help="list and draw the N lowest-Dice images")
    sg.add_argument("--overlays", choices=["worst", "all"], default="worst", help="which images get an overlay PNG")
    sg.add_argument("--out", help="folder (path or URI) for seg.csv/.parquet, summary.json and the PNGs")


def _eval_style_flags(st: argparse.ArgumentParser) -> None:
    st.add_argument("--style", help="style image (default: the one the model was trained with)")
    st.add_argument("--size", type=COUNT, help="side of the centre square the losses are measured on "
                                             "(default: the training content size)")
    st.add_argument("--style-size", type=COUNT, help="the style image's shorter side for its Gram targets "
                                                   "(default: the training run's, from the artifact)")
    st.add_argument("--vgg-weights", default="imagenet",
                    help="loss network: 'imagenet' (torchvision), a vgg16_bn state_dict path/URI, or 'random'")
    st.add_argument("--out", help="folder (path or URI) for per-model CSV/Parquet/summary and the grid PNGs")


# Each eval subcommand: its help, its description, --model's and --data's help, and its own flags.
EVAL = {
    "sr": ("PSNR/SSIM of an SR model next to bicubic",
           "Per-image and mean PSNR/SSIM under the standard SR protocol: HR cropped to a "
           "multiple of the scale, LR made with MATLAB-compatible bicubic, output quantised "
           "to uint8, Y channel (BT.601) with `scale` pixels shaved. Bicubic is always shown "
           "beside the model.",
           "artifact path/URI, or 'bicubic'", "folder of HR images (searched recursively)", _eval_sr_flags),
    "seg": ("Dice / IoU / accuracy of a segmentation model, overlays, worst images",
            "Per-image Dice, IoU and pixel accuracy of a segmentation model against the masks under "
            "DATA (paired as training pairs them), scored at each mask's own resolution. Writes overlay "
            "PNGs (the mask over the photo with transparency) and lists the worst images.",
            "seg artifact path/URI", "images and masks (e.g. images/ + masks/, Carvana names)", _eval_seg_flags),
    "style": ("content and per-layer style losses of style models, content | stylised grids",
              "Content loss and per-layer Gram (style) losses, as the training objective weighs them, "
              "of each style model on held-out content images (centre squares), plus a grid PNG per "
              "model: the style image, then content | stylised per image.",
              "style artifact path/URI (repeatable)", "held-out content images", _eval_style_flags),
}


def _eval_flags(ev: argparse.ArgumentParser) -> None:
    ev_sub = ev.add_subparsers(dest="what", metavar="TASK", required=True)
    for name, (text, description, model, data, flags) in EVAL.items():
        p = ev_sub.add_parser(name, help=text, description=description)
        p.add_argument("--model", required=True, action="append" if name == "style" else "store", help=model)
        p.add_argument("--data", required=True, help=data)
        flags(p)
        add_shared_options(p, "--tile", "--overlap", "--amp", "--compile", as_translate=True)


def _report_flags(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("run", help="training run folder or batch DST (path or URI)")
    rp.add_argument("--out", help="folder for report.md (training default: RUN/imgxlate)")
    rp.add_argument("--slowest", type=NONNEG, default=10, help="batch: list the N slowest inputs")


def _info_flags(i: argparse.ArgumentParser) -> None:
    i.add_argument("model", help="artifact path/URI, shipped model name, or a .pth/.ckpt/.safetensors file/URI")


def _verify_flags(v: argparse.ArgumentParser) -> None:
    v.add_argument("dst", help="a translate run's DST (s3://bucket/prefix or a local folder)")
    v.add_argument("--checksums", action="store_true",
                   help="also read every output and compare its sha256 with its manifest row's (default: sizes)")
    v.add_argument("--redo", action="store_true",
                   help="mark the inputs whose output is missing or damaged, so that the next translate with the "
                        "same SRC, DST and options redoes exactly those (takes DST's lease)")
    v.add_argument("--lease", choices=("on", "off"), default="on",
                   help="--redo holds DST/_manifest/LEASE as translate does (default on); off: at your risk")
    v.add_argument("--s3-endpoint", help="endpoint URL of an S3-compatible store (else AWS_ENDPOINT_URL)")


def _sample_photos_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("dst")
    s.add_argument("--max-side", type=COUNT, default=None, help="downscale photos larger than this")
    s.add_argument("--holdout", type=NONNEG, default=0, help="write N photos to DST/heldout, the rest to DST/train")


# Each command, in the order `imgxlate --help` lists them: its help, its description, its flags.
COMMANDS = {
    "translate": ("run a model over an image collection (S3 or local) with Ray Data",
                  "Stream every image under SRC through pools of model actors and write the outputs "
                  "under DST with the same relative keys, plus a Parquet manifest with one row per input "
                  "(failures included) and a summary.json under DST/_manifest/<run_id>/. Rerunning with "
                  "the same DST skips inputs already done and retries the failed ones. Exit status: 0 "
                  "when the job ran, 2 when it could not run, 1 with --fail-on-error when any input failed.",
                  add_translate_arguments),
    "train": ("train a model on Ray Train (sr, style or seg)",
              "Train with Ray Train's TorchTrainer on N workers (DDP: gloo on CPUs, NCCL "
              "on GPUs), checkpointing to --storage every epoch; the same --name and "
              "--storage resume. Ends with a model artifact that `translate` uses.", _train_flags),
    "lr-find": ("LR finder: loss-vs-LR plot and a suggested rate",
                "Train briefly with an exponentially growing LR (one process, no Ray), "
                "write the loss-vs-LR plot and print a suggested LR.", _lr_find_flags),
    "eval": ("measure model quality under the standard protocols", "Measure model quality against ground truth.",
             _eval_flags),
    "report": ("Markdown report of a training run folder or a batch job's DST",
               "RUN is a training run folder (<storage>/<name>, with imgxlate/metrics.jsonl): writes "
               "curves.png and report.md into RUN/imgxlate/. Or RUN is a batch job's DST: summarises its "
               "manifest (counts by status, throughput, time per stage, slowest inputs, sample errors). "
               "The Markdown is printed; --out also writes it (and the curves) to a folder.", _report_flags),
    "verify": ("check that a translate run's outputs are all there, as its manifest records them",
               "Read DST's manifest shard by shard and check that each input's latest row is ok and its output "
               "exists with the recorded size (--checksums: and sha256). Prints the counts, writes the problems "
               "to DST/_manifest/_verify/<id>.parquet. Exit status: 0 when every input is proven done, 1 when "
               "there are problems, 2 when DST cannot be verified. --redo makes the next translate with the same "
               "SRC, DST and options redo exactly the inputs whose output is bad.", _verify_flags),
    "models": ("list shipped models (with scores) and model families, configs, presets", None, None),
    "info": ("print a model artifact's config.json", None, _info_flags),
    "sample-photos": ("write scikit-image's sample photos to a folder (for demos)", None, _sample_photos_flags),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgxlate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (text, description, flags) in COMMANDS.items():
        command = sub.add_parser(name, help=text, description=description)
        if flags:
            flags(command)
    return p
