"""The ``imgxlate`` command line. Each subcommand parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys

DESCRIPTION = """\
imgxlate: image-to-image models (super-resolution, style transfer, U-Net segmentation)
trained on Ray Train and run over large image collections with Ray Data.

Models are given as the path or URI (s3://...) of a model artifact folder, or as 'bicubic'
(zero parameters, any scale) for the baseline."""


# ---------------------------------------------------------------------------------------------- eval
def _save_eval(out: str, name: str, rows: list[dict], summary: dict) -> None:
    """Per-image rows as CSV and Parquet plus a summary.json, under the ``out`` folder (path or URI)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgxlate.io import storage

    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    storage.write_bytes(storage.join(out, f"{name}.csv"), text.getvalue().encode())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(storage.join(out, f"{name}.parquet"), buf.getvalue())
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=2).encode())


def _flat(row) -> dict:
    return {k: v for k, v in dataclasses.asdict(row).items() if k not in ("crop", "pictures", "terms")}


def _predictor(args, scale=None, **options):
    """The batch job's Predictor for ``--model``, with the tile options eval shares with translate."""
    from imgxlate.infer.predictor import PredictOptions, Predictor

    return Predictor(args.model if isinstance(args.model, str) else args.model[0], scale,
                     options=PredictOptions(tile=args.tile, overlap=args.overlap, **options))


def cmd_eval_sr(args) -> int:
    from imgxlate import metrics, plots
    from imgxlate.evaluate import eval_sr, mean_of, read_named
    from imgxlate.io import storage

    predictor = _predictor(args, args.scale, ensemble=args.ensemble)
    rows = eval_sr(predictor, read_named(args.data), args.scale, y_channel=not args.rgb,
                   crop=args.crop if args.sheet else 0, degradations=args.degradations, seed=args.seed)
    if not rows:
        print(f"no images under {args.data}", file=sys.stderr)
        return 2
    protocol = metrics.PROTOCOL_RGB if args.rgb else metrics.PROTOCOL_Y
    model = predictor.model
    name = getattr(model, "meta", {}).get("model_id", args.model) + ("+ensemble" if args.ensemble else "")
    print(f"x{args.scale}  model={name}  protocol: {protocol}"
          + (f"  LR degraded: {args.degradations} (seed {args.seed})" if args.degradations != "none" else ""))
    print(f"{'image':<28}{'size':>11}{'PSNR':>9}{'SSIM':>8}{'bic PSNR':>10}{'bic SSIM':>10}")
    for r in rows:
        print(f"{r.image:<28}{r.width:>5}x{r.height:<5}{r.psnr:>9.2f}{r.ssim:>8.4f}"
              f"{r.psnr_bicubic:>10.2f}{r.ssim_bicubic:>10.4f}")
    mean = mean_of(rows, ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic"))
    print(f"{'mean (' + str(len(rows)) + ' images)':<39}{mean['psnr']:>9.2f}{mean['ssim']:>8.4f}"
          f"{mean['psnr_bicubic']:>10.2f}{mean['ssim_bicubic']:>10.4f}")
    if args.out:
        common = {"scale": args.scale, "protocol": protocol, "model": name, "ensemble": args.ensemble,
                  "degradations": args.degradations, "seed": args.seed}
        _save_eval(args.out, f"sr_x{args.scale}", [{**_flat(r), **common} for r in rows],
                   {**common, "data": args.data, "images": len(rows), "mean": mean,
                    "contract": predictor.contract.to_dict(), "tile": predictor.options.tile})
        print(f"per-image results: {storage.join(args.out, f'sr_x{args.scale}.csv')} (and .parquet, summary.json)")
        if args.sheet:
            sheet = storage.join(args.out, f"sheet_x{args.scale}.png")
            storage.write_bytes(sheet, plots.sr_sheet(rows[:args.sheet], args.scale, protocol, name))
            print(f"before/after sheet: {sheet}")
    return 0


def cmd_eval_seg(args) -> int:
    from imgxlate import plots
    from imgxlate.evaluate import eval_seg, mean_of, read_seg_samples, seg_pairs, training_seg_settings
    from imgxlate.io import storage

    predictor = _predictor(args)
    model = predictor.model
    if model.task != "seg":
        print(f"{args.model} is a {model.task} model, not a segmentation model", file=sys.stderr)
        return 2
    if args.size:
        predictor.contract = dataclasses.replace(predictor.contract, size=args.size)
    trained = training_seg_settings(getattr(model, "meta", {}))
    pairs = seg_pairs(args.data, args.split, trained["val_fraction"], trained["seed"])
    rows = eval_seg(predictor, read_seg_samples(pairs, root=args.data))
    if not rows:
        print(f"no image/mask pairs under {args.data} (split {args.split})", file=sys.stderr)
        return 2
    name = model.meta["model_id"]
    mean = mean_of(rows, ("dice", "iou", "accuracy"))
    print(f"model={name}  split={args.split}  input: {predictor.contract.describe()}; "
          f"scored at the mask's resolution")
    worst = sorted(rows, key=lambda r: r.dice)[:args.worst]
    print(f"{'image':<36}{'Dice':>8}{'IoU':>8}{'acc':>8}{'fg':>7}   (worst {len(worst)})")
    for r in worst:
        print(f"{r.image:<36}{r.dice:>8.4f}{r.iou:>8.4f}{r.accuracy:>8.4f}{r.foreground:>7.3f}")
    print(f"{'mean (' + str(len(rows)) + ' images)':<36}"
          f"{mean['dice']:>8.4f}{mean['iou']:>8.4f}{mean['accuracy']:>8.4f}")
    if args.out:
        common = {"model": name, "split": args.split, "size": predictor.contract.size or 0}
        _save_eval(args.out, "seg", [{**_flat(r), **common} for r in rows],
                   {**common, "data": args.data, "images": len(rows), "mean": mean,
                    "contract": predictor.contract.to_dict(), "worst": [r.image for r in worst]})
        shown = rows if args.overlays == "all" else worst
        for r in shown:
            stem = r.image.rsplit(".", 1)[0].replace("/", "__")
            storage.write_bytes(storage.join(args.out, "overlays", f"{stem}.png"), plots.seg_panel(r))
        if worst:
            storage.write_bytes(storage.join(args.out, "worst.png"),
                                plots.seg_sheet(worst, f"{name}: the {len(worst)} lowest-Dice images"))
        print(f"results in {args.out}: seg.csv/.parquet, summary.json, worst.png, {len(shown)} overlays/*.png")
    return 0


def cmd_eval_style(args) -> int:
    from imgxlate import plots
    from imgxlate.evaluate import eval_style, read_named
    from imgxlate.io import storage
    from imgxlate.io.images import read_rgb
    from imgxlate.train.objectives import style_size_of

    if args.style and len(args.model) > 1:
        print("--style overrides the style image of one model only; give one --model with it", file=sys.stderr)
        return 2
    images = read_named(args.data, read_rgb)
    if not images:
        print(f"no images under {args.data}", file=sys.stderr)
        return 2
    summary = {}
    for spec in args.model:
        predictor = _predictor(argparse.Namespace(model=spec, tile=args.tile, overlap=args.overlap))
        model = predictor.model
        cfg = model.meta.get("provenance", {}).get("config", {})
        style_uri = args.style or cfg.get("style_image")
        if not style_uri:
            print(f"{spec} does not record its style image: pass --style", file=sys.stderr)
            return 2
        style = read_rgb(style_uri)
        size = args.size or cfg.get("content_size", 256)
        style_size = args.style_size or style_size_of(cfg)       # as the run computed its Gram targets
        rows = eval_style(predictor, images, style, size=size, vgg_weights=args.vgg_weights,
                          content_weight=cfg.get("content_weight", 1e4), style_size=style_size)
        name = model.meta["model_id"]
        terms = list(rows[0].terms)
        print(f"model={name}  style={style_uri} at {style_size or 'full'} px  losses on the centre {size} px square"
              f"  vgg={args.vgg_weights} (lower is better)")
        print(f"{'image':<28}{'loss':>10}" + "".join(f"{t:>12}" for t in terms))
        for r in rows:
            print(f"{r.image:<28}{r.loss:>10.4g}" + "".join(f"{r.terms[t]:>12.4g}" for t in terms))
        mean = {"loss": sum(r.loss for r in rows) / len(rows),
                **{t: sum(r.terms[t] for r in rows) / len(rows) for t in terms}}
        print(f"{'mean':<28}{mean['loss']:>10.4g}" + "".join(f"{mean[t]:>12.4g}" for t in terms))
        summary[name] = {"style": style_uri, "size": size, "style_size": style_size, "images": len(rows), "mean": mean}
        if args.out:
            out = storage.join(args.out, name)
            common = {"model": name, "style": style_uri, "size": size, "vgg_weights": args.vgg_weights}
            _save_eval(out, "style", [{"image": r.image, "loss": r.loss, **r.terms, **common} for r in rows],
                       summary[name])
            storage.write_bytes(storage.join(args.out, f"grid-{name}.png"),
                                plots.style_grid(rows, style, f"{name}: content | stylised (as the batch job "
                                                              f"writes them)"))
            print(f"results in {out}; grid {storage.join(args.out, f'grid-{name}.png')}")
    return 0


def cmd_report(args) -> int:
    from imgxlate import plots, report
    from imgxlate.io import storage

    try:
        what = report.kind(args.run)
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 2
    if what == "training":
        text, history = report.training(args.run)
        out = args.out or storage.join(args.run, "imgxlate")
        if history:
            storage.write_bytes(storage.join(out, "curves.png"),
                                plots.training_curves(history, f"run {args.run.rstrip('/').split('/')[-1]}"))
    else:
        text = report.batch(args.run, slowest=args.slowest)
        out = args.out
    print(text)
    if out:
        storage.write_bytes(storage.join(out, "report.md"), text.encode())
        print(f"[imgxlate] report written to {storage.join(out, 'report.md')}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- translate
def add_translate_arguments(p: argparse.ArgumentParser) -> None:
    """The batch job's options (shared by `imgxlate translate` and jobs/translate.py)."""
    from imgxlate.io import codec, listing

    p.add_argument("src", help="s3://bucket/prefix, a local folder, or a manifest (.parquet/.csv/.txt of URIs)")
    p.add_argument("dst", help="s3://bucket/prefix or a local folder; outputs mirror the source's keys")
    p.add_argument("--model", required=True, help="artifact path/URI, or 'bicubic' (with --scale)")
    p.add_argument("--scale", type=float, default=None, help="upscaling factor for 'bicubic'; checked for artifacts")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--extensions", default=",".join(e.lstrip(".") for e in listing.IMAGE_EXTS),
                    help="comma-separated input extensions to take from a listing (default: %(default)s)")
    io.add_argument("--limit", type=int, help="process at most this many inputs (in listing order)")
    io.add_argument("--format", default="png", choices=list(codec.FORMATS), help="output format (default png)")
    io.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    io.add_argument("--suffix", default="", help="added to each output name before the extension, e.g. _x4")
    io.add_argument("--cutout", action="store_true", help="segmentation: write the RGBA cut-out, not the mask")
    io.add_argument("--max-pixels", type=int, default=codec.DEFAULT_MAX_PIXELS,
                    help="inputs with more pixels get a too_large row (default %(default)s)")
    io.add_argument("--s3-endpoint", help="endpoint URL of an S3-compatible store (else AWS_ENDPOINT_URL)")
    rs = p.add_argument_group("resources")
    rs.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS if set, else start Ray locally)")
    rs.add_argument("--num-cpus", type=int, help="logical CPUs when Ray is started locally (default: all)")
    rs.add_argument("--actors", type=int, help="model actors (default: one per GPU; on CPUs, one per "
                    "--cpus-per-actor of the cluster with the fused pipeline, 1 with the split one)")
    rs.add_argument("--gpus-per-actor", type=float, help="GPUs per model actor (default: 1 if the cluster has GPUs)")
    rs.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per model actor (default 1)")
    rs.add_argument("--io-cpus", type=float, default=0.25, help="CPUs per read/decode or encode/write task")
    rs.add_argument("--batch-size", type=int, default=8,
                    help="images per model run within an input block (default 8; small images of one size are "
                         "batched up to a pixel budget inside a run)")
    rs.add_argument("--tile", type=int, default=None,
                    help="tile side in input pixels for large images (default: 256 on CPU, 1024 on GPU)")
    rs.add_argument("--overlap", type=int, default=32, help="tile overlap in input pixels")
    rs.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"], help="autocast on GPU")
    run = p.add_argument_group("run")
    run.add_argument("--dry-run", action="store_true", help="list and count inputs, estimate output size, stop")
    run.add_argument("--fail-on-error", action="store_true", help="exit 1 when any input failed")
    run.add_argument("--wait-for-lease", type=float, default=0.0, metavar="SECONDS",
                     help="when another run holds DST, wait up to this long for it (default: stop at once, exit 2)")
    rs.add_argument("--max-model-retries", type=int, default=3,
                    help="retries of a batch whose model actor died; then its inputs get model_error (default 3)")
    run.add_argument("--run-id", help="name for this run's manifest folder: letters, digits, '.', '_', '-' "
                                      "(default: time + random)")
    run.add_argument("--shard-size", type=int, default=10_000,
                     help="inputs per shard, the unit of manifest parts and of resume (default %(default)s)")
    run.add_argument("--queued-inputs", type=int, default=20_000,
                     help="inputs handed to the pipeline ahead of what it has taken (default %(default)s)")
    run.add_argument("--pipeline", choices=["auto", "fused", "split"], default="auto",
                     help="fused: read, decode, model, encode and write in one model-actor call (no task hops; "
                          "one actor per --cpus-per-actor); split: read/decode and encode/write tasks around the "
                          "actors; auto (default): fused on CPU actors, split on GPU actors")


def translate_config(args):
    from imgxlate.infer.job import TranslateConfig

    return TranslateConfig(
        src=args.src, dst=args.dst, model=args.model, scale=args.scale, suffix=args.suffix, format=args.format,
        quality=args.quality, extensions=tuple(e.strip() for e in args.extensions.split(",") if e.strip()),
        limit=args.limit, max_pixels=args.max_pixels, tile=args.tile, overlap=args.overlap, amp=args.amp,
        cutout=args.cutout, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size, io_cpus=args.io_cpus,
        ray_address=args.ray_address, num_cpus=args.num_cpus, s3_endpoint=args.s3_endpoint,
        wait_for_lease_s=args.wait_for_lease, max_model_retries=args.max_model_retries,
        run_id=args.run_id, dry_run=args.dry_run, fail_on_error=args.fail_on_error, shard_size=args.shard_size,
        queued_inputs=args.queued_inputs, pipeline=args.pipeline)


def cmd_translate(args) -> int:
    import traceback

    from imgxlate.infer import job
    from imgxlate.io.listing import redact_text, userinfo

    # Whatever is printed goes through redaction: URLs lose their user info and signed query strings,
    # and credentials given inside SRC, DST or --model (refused by the job) are masked wherever they appear.
    secrets = {part for uri in (args.src, args.dst, args.model) for part in
               (userinfo(uri), *userinfo(uri).split(":", 1)) if len(part) >= 4}

    def clean(text: str) -> str:
        text = redact_text(text)
        for part in sorted(secrets, key=len, reverse=True):
            text = text.replace(part, "***")
        return text

    error, trace = None, ""
    try:
        summary = job.run(translate_config(args))
    except Exception as e:
        error, trace = e, traceback.format_exc()
    if isinstance(error, job.JobError):
        print(clean(f"imgxlate translate: error: {error}"), file=sys.stderr)
        return 2
    if isinstance(error, job.Interrupted):
        print(f"imgxlate translate: {error}: {error.summary['not_started']} inputs not started; rerun the same "
              f"command to finish", file=sys.stderr)
        return 128 + error.signum           # 130 for SIGINT, 143 for SIGTERM
    if error is not None:
        print(clean(trace), file=sys.stderr)
        return 1
    if args.fail_on_error and summary.get("failed"):
        print(f"imgxlate translate: {summary['failed']} inputs failed (see the manifest)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------- train
def add_train_arguments(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("data", help="training images: folder, s3:// prefix or manifest" +
                   (" (images with <name>_mask.gif|png masks)" if task == "seg" else ""))
    p.add_argument("--val", help="validation images (default: a seeded 10%% of the training images, held out "
                                 "from training)" if task != "seg" else argparse.SUPPRESS)
    p.add_argument("--name", default=f"{task}-run", help="run name: the same name and storage resume the run")
    p.add_argument("--storage", default="runs", help="checkpoint storage: local folder or s3://bucket/prefix")
    p.add_argument("--out", help="model artifact URI (default: <storage>/<name>/model)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP processes)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS if set, else start Ray locally)")
    p.add_argument("--wait-for-resources", type=float, default=0, metavar="SECONDS",
                   help="when the cluster cannot hold the workers (e.g. --gpu without GPU nodes), ask its "
                        "autoscaler and wait this long before giving up (default 0: stop at once, exit 2)")
    p.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="how workers are placed on nodes (STRICT_SPREAD: one per node)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from")
    p.add_argument("--epochs", type=int, default=5, help="epochs per stage when --stages is not given")
    p.add_argument("--batch-size", type=int, default=16, help="per worker; the LR scales with the global batch")
    p.add_argument("--lr", type=float, default=1e-3, help="peak LR for a global batch of --reference-batch")
    p.add_argument("--reference-batch", type=int, default=16)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup", type=float, default=0.25, help="one-cycle warmup fraction")
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"], help="GPU autocast")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights, e.g. 0.999 (0: off)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap the steps per epoch (0: all)")
    p.add_argument("--limit", type=int, help="use at most this many training images (seg: image/mask pairs)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples and the held-out split")
    p.add_argument("--cache-mb", type=float, default=1024,
                   help="decoded training images each worker keeps (least recently used first out), in MB")
    p.add_argument("--preset", help="model preset (sr: lesson, edsr-baseline, edsr, tiny)")
    p.add_argument("--model-config", default="{}", help="JSON of model config overrides, e.g. '{\"nf\": 32}'")
    p.add_argument("--vgg-weights", default="imagenet", help="imagenet, a path/URI, or random (tests)")
    if task == "sr":
        p.add_argument("--scale", type=int, default=2)
        p.add_argument("--stages", help="progressive plan scale:epochs[:new], e.g. 2:3,4:1:new,4:3")
        p.add_argument("--hr-crop", type=int, default=96,
                       help="HR crop side (training images smaller than it are skipped, with a warning)")
        p.add_argument("--samples-per-image", type=int, default=8, help="random crops per image per epoch")
        p.add_argument("--loss", default="l1", choices=["l1", "mse", "perceptual"])
        p.add_argument("--degradations", default="none",
                       help="restoration degradations: none, restore, denoise, deblock, colourise")
    elif task == "seg":
        p.add_argument("--stages", help="progressive plan size:epochs[:frozen], e.g. 128:2:frozen,128:2,256:2")
        p.add_argument("--val-fraction", type=float, default=0.2, help="groups (car ids) held out")
        p.add_argument("--loss", default="bce_dice", choices=["bce", "bce_dice"],
                       help="BCE with logits (the lesson's) or BCE + soft Dice (default)")
        p.add_argument("--encoder-weights", default="imagenet", help="none, imagenet, or a path/URI")
    else:
        p.add_argument("--style-image", required=True, help="the style painting (path or URI)")
        p.add_argument("--content-size", type=int, default=256)
        p.add_argument("--style-size", type=int,
                       help="the style image's shorter side for its Gram targets, resized first (default: the "
                            "content size, as the lesson)")
        p.add_argument("--content-weight", type=float, default=1e4)
        p.add_argument("--samples-per-image", type=int, default=4)
        p.add_argument("--norm", default="instance", choices=["batch", "instance"])


def train_config(args, task: str):
    from imgxlate.train.loop import LoopConfig
    from imgxlate.train.run import parse_stages
    from imgxlate.train.tasks import RunConfig

    model = json.loads(args.model_config)
    extra: dict = {}
    if task == "sr":
        model.setdefault("scale", args.scale)
        extra = {"hr_crop": args.hr_crop, "samples_per_image": args.samples_per_image, "loss": args.loss,
                 "degradations": args.degradations}
    elif task == "seg":
        model.setdefault("encoder_weights", args.encoder_weights)
        extra = {"val_fraction": args.val_fraction, "seg_loss": args.loss}
    else:
        model.setdefault("norm", args.norm)
        extra = {"style_image": args.style_image, "content_size": args.content_size, "style_size": args.style_size,
                 "content_weight": args.content_weight, "samples_per_image": args.samples_per_image}
    loop = LoopConfig(epochs=args.epochs, lr=args.lr, reference_batch=args.reference_batch,
                      weight_decay=args.weight_decay, warmup_pct=args.warmup, clip_grad=args.clip_grad,
                      amp=args.amp, ema=args.ema, checkpoint_every=args.checkpoint_every,
                      max_steps_per_epoch=args.steps_per_epoch)
    return RunConfig(task=task, data=args.data, val=getattr(args, "val", None), name=args.name,
                     storage=args.storage, out=args.out, preset=args.preset, model=model,
                     stages=parse_stages(task, getattr(args, "stages", None)), loop=loop,
                     batch_size=args.batch_size, workers=args.workers, use_gpu=args.gpu,
                     cpus_per_worker=args.cpus_per_worker, placement=args.placement,
                     max_failures=args.max_failures, seed=args.seed,
                     limit=args.limit, cache_mb=args.cache_mb, vgg_weights=args.vgg_weights, **extra)


def cmd_train(args) -> int:
    from imgxlate.train.ray_train import ResourceError
    from imgxlate.train.run import train
    from imgxlate.train.tasks import DataError

    try:
        train(train_config(args, args.task), ray_address=args.ray_address,
              wait_for_resources=args.wait_for_resources)
    except (DataError, ResourceError) as e:
        print(f"imgxlate train: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_lr_find(args) -> int:
    import torch

    from imgxlate import plots
    from imgxlate.io import storage
    from imgxlate.train import tasks
    from imgxlate.train.lr_find import lr_find

    cfg = train_config(args, args.task)
    task = tasks.task_of(cfg)
    stage = task.stages(cfg)[0]
    try:
        task.check(cfg)
    except tasks.DataError as e:
        print(f"imgxlate lr-find: error: {e}", file=sys.stderr)
        return 2
    model, _ = task.build_model(cfg, stage, None)
    td = task.stage_data(cfg, stage, "cpu")
    loader = torch.utils.data.DataLoader(td.train, batch_size=cfg.batch_size, shuffle=True)
    lrs, losses, suggestion = lr_find(model, td.objective, loader, args.start_lr, args.end_lr, args.steps)
    storage.write_bytes(args.plot, plots.lr_find_plot(lrs, losses, suggestion))
    print(f"suggested lr: {suggestion:.3e} (for a batch of {cfg.batch_size}); plot: {args.plot}")
    return 0


# ------------------------------------------------------------------------------------ models / info
def cmd_models(args) -> int:
    from imgxlate import zoo
    from imgxlate.models import PRESETS, REGISTRY

    print("shipped models (use by name: --model NAME):")
    for name in zoo.names():
        meta = zoo.meta(name)
        shipped = meta.get("shipped", {})
        print(f"  {name:<13}{meta['model_id']}  {shipped.get('summary', '')}")
        for ds, s in shipped.get("scores", {}).items():
            print(f"  {'':<13}{ds:<15}{s['psnr']:.2f} dB / {s['ssim']:.4f}   bicubic {s['psnr_bicubic']:.2f} / "
                  f"{s['ssim_bicubic']:.4f}")
        if shipped:
            print(f"  {'':<13}protocol: {shipped['protocol']}")
            print(f"  {'':<13}trained: {shipped['command']}")
            print(f"  {'':<13}data: {shipped['data']}; terms: {shipped['terms']}")
    print("\nmodel families (train with `imgxlate train`):")
    for arch, (cfg_cls, model_cls) in REGISTRY.items():
        doc = (model_cls.__doc__ or sys.modules[model_cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"  {arch:<15}task={model_cls.task:<6}{doc}")
        print(f"  {'':<15}config: {dataclasses.asdict(cfg_cls())}")
        for name, cfg in PRESETS.get(arch, {}).items():
            print(f"  {'':<15}preset {name}: {dataclasses.asdict(cfg)}")
    print("\nthird-party: any .pth / .ckpt / .safetensors file spandrel recognises (imgxlate info FILE)")
    return 0


def cmd_info(args) -> int:
    from imgxlate.infer.predictor import model_meta

    meta = model_meta(args.model)
    print(json.dumps(meta, indent=2))
    if meta.get("format") == "spandrel":
        print(f"{meta['architecture']} x{meta['scale']:g}, {meta['n_params']:,} parameters, licence: {meta['licence']}")
    return 0


def cmd_sample_photos(args) -> int:
    from imgxlate.samples import write_sample_photos

    paths = write_sample_photos(args.dst, max_side=args.max_side, holdout=args.holdout)
    print(f"wrote {len(paths)} sample photos (scikit-image's data set) to {args.dst}")
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgxlate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tr = sub.add_parser(
        "translate", help="run a model over an image collection (S3 or local) with Ray Data",
        description="Stream every image under SRC through pools of model actors and write the outputs "
                    "under DST with the same relative keys, plus a Parquet manifest with one row per input "
                    "(failures included) and a summary.json under DST/_manifest/<run_id>/. Rerunning with "
                    "the same DST skips inputs already done and retries the failed ones. Exit status: 0 "
                    "when the job ran, 2 when it could not run, 1 with --fail-on-error when any input failed.")
    add_translate_arguments(tr)
    tr.set_defaults(func=cmd_translate)

    trn = sub.add_parser("train", help="train a model on Ray Train (sr, style or seg)",
                         description="Train with Ray Train's TorchTrainer on N workers (DDP: gloo on CPUs, NCCL "
                                     "on GPUs), checkpointing to --storage every epoch; the same --name and "
                                     "--storage resume. Ends with a model artifact that `translate` uses.")
    trn_sub = trn.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, text in (("sr", "super-resolution / restoration (EDSR-style)"), ("style", "fast style transfer"),
                       ("seg", "U-Net segmentation")):
        tp = trn_sub.add_parser(task, help=text)
        add_train_arguments(tp, task)
        tp.set_defaults(func=cmd_train)

    lf = sub.add_parser("lr-find", help="LR finder: loss-vs-LR plot and a suggested rate",
                        description="Train briefly with an exponentially growing LR (one process, no Ray), "
                                    "write the loss-vs-LR plot and print a suggested LR.")
    lf_sub = lf.add_subparsers(dest="task", metavar="TASK", required=True)
    for task in ("sr", "style", "seg"):
        tp = lf_sub.add_parser(task)
        add_train_arguments(tp, task)
        tp.add_argument("--plot", default="lr_find.png", help="where to write the plot (path or URI)")
        tp.add_argument("--start-lr", type=float, default=1e-6)
        tp.add_argument("--end-lr", type=float, default=1.0)
        tp.add_argument("--steps", type=int, default=60)
        tp.set_defaults(func=cmd_lr_find)

    ev = sub.add_parser("eval", help="measure model quality under the standard protocols",
                        description="Measure model quality against ground truth.")
    ev_sub = ev.add_subparsers(dest="what", metavar="TASK", required=True)
    sr = ev_sub.add_parser(
        "sr", help="PSNR/SSIM of an SR model next to bicubic",
        description="Per-image and mean PSNR/SSIM under the standard SR protocol: HR cropped to a "
                    "multiple of the scale, LR made with MATLAB-compatible bicubic, output quantised "
                    "to uint8, Y channel (BT.601) with `scale` pixels shaved. Bicubic is always shown "
                    "beside the model.")
    sr.add_argument("--model", required=True, help="artifact path/URI, or 'bicubic'")
    sr.add_argument("--data", required=True, help="folder of HR images (searched recursively)")
    sr.add_argument("--scale", type=int, required=True, help="upscaling factor (2, 4, ...)")
    sr.add_argument("--rgb", action="store_true", help="RGB PSNR/SSIM instead of the Y channel")
    sr.add_argument("--ensemble", action="store_true",
                    help="EDSR's 8-way geometric self-ensemble (flips and rotations, averaged; 8x the compute)")
    sr.add_argument("--out", help="folder (path or URI) for per-image CSV/Parquet, summary.json and the sheet PNG")
    sr.add_argument("--degradations", default="none",
                    help="degrade each LR image as restoration training does (none, restore, denoise, deblock, "
                         "colourise); model and bicubic get the same degraded input")
    sr.add_argument("--seed", type=int, default=0, help="seed of the degradations drawn per image")
    sr.add_argument("--sheet", type=int, default=6, help="images on the before/after sheet (0: none)")
    sr.add_argument("--crop", type=int, default=160, help="sheet crop side in HR pixels (the most detailed region)")
    sr.add_argument("--tile", type=int, default=None,
                    help="tile side in input pixels, as translate's (default: 256 on CPU, 1024 on GPU)")
    sr.add_argument("--overlap", type=int, default=32, help="tile overlap in input pixels, as translate's")
    sr.set_defaults(func=cmd_eval_sr)

    sg = ev_sub.add_parser(
        "seg", help="Dice / IoU / accuracy of a segmentation model, overlays, worst images",
        description="Per-image Dice, IoU and pixel accuracy of a segmentation model against the masks under "
                    "DATA (paired as training pairs them), scored at each mask's own resolution. Writes overlay "
                    "PNGs (the mask over the photo with transparency) and lists the worst images.")
    sg.add_argument("--model", required=True, help="seg artifact path/URI")
    sg.add_argument("--data", required=True, help="images and masks (e.g. images/ + masks/, Carvana names)")
    sg.add_argument("--split", choices=["all", "val", "train"], default="all",
                    help="'val': only the groups (cars) the training run held out (its seed and fraction)")
    sg.add_argument("--size", type=int, help="override the contract's input size (default: the last training stage's)")
    sg.add_argument("--worst", type=int, default=8, help="list and draw the N lowest-Dice images")
    sg.add_argument("--overlays", choices=["worst", "all"], default="worst", help="which images get an overlay PNG")
    sg.add_argument("--out", help="folder (path or URI) for seg.csv/.parquet, summary.json and the PNGs")
    sg.add_argument("--tile", type=int, default=None,
                    help="tile side in input pixels, as translate's (default: 256 on CPU, 1024 on GPU)")
    sg.add_argument("--overlap", type=int, default=32, help="tile overlap in input pixels, as translate's")
    sg.set_defaults(func=cmd_eval_seg)

    st = ev_sub.add_parser(
        "style", help="content and per-layer style losses of style models, content | stylised grids",
        description="Content loss and per-layer Gram (style) losses, as the training objective weighs them, "
                    "of each style model on held-out content images (centre squares), plus a grid PNG per "
                    "model: the style image, then content | stylised per image.")
    st.add_argument("--model", required=True, action="append", help="style artifact path/URI (repeatable)")
    st.add_argument("--data", required=True, help="held-out content images")
    st.add_argument("--style", help="style image (default: the one the model was trained with)")
    st.add_argument("--size", type=int, help="side of the centre square the losses are measured on "
                                             "(default: the training content size)")
    st.add_argument("--style-size", type=int, help="the style image's shorter side for its Gram targets "
                                                   "(default: the training run's, from the artifact)")
    st.add_argument("--vgg-weights", default="imagenet",
                    help="loss network: 'imagenet' (torchvision), a vgg16_bn state_dict path/URI, or 'random'")
    st.add_argument("--out", help="folder (path or URI) for per-model CSV/Parquet/summary and the grid PNGs")
    st.add_argument("--tile", type=int, default=None,
                    help="tile side in input pixels, as translate's (default: 256 on CPU, 1024 on GPU)")
    st.add_argument("--overlap", type=int, default=32, help="tile overlap in input pixels, as translate's")
    st.set_defaults(func=cmd_eval_style)

    rp = sub.add_parser(
        "report", help="Markdown report of a training run folder or a batch job's DST",
        description="RUN is a training run folder (<storage>/<name>, with imgxlate/metrics.jsonl): writes "
                    "curves.png and report.md into RUN/imgxlate/. Or RUN is a batch job's DST: summarises its "
                    "manifest (counts by status, throughput, time per stage, slowest inputs, sample errors). "
                    "The Markdown is printed; --out also writes it (and the curves) to a folder.")
    rp.add_argument("run", help="training run folder or batch DST (path or URI)")
    rp.add_argument("--out", help="folder for report.md (training default: RUN/imgxlate)")
    rp.add_argument("--slowest", type=int, default=10, help="batch: list the N slowest inputs")
    rp.set_defaults(func=cmd_report)

    m = sub.add_parser("models", help="list shipped models (with scores) and model families, configs, presets")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("info", help="print a model artifact's config.json")
    i.add_argument("model", help="artifact path/URI, shipped model name, or a .pth/.ckpt/.safetensors file/URI")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("sample-photos", help="write scikit-image's sample photos to a folder (for demos)")
    s.add_argument("dst")
    s.add_argument("--max-side", type=int, default=None, help="downscale photos larger than this")
    s.add_argument("--holdout", type=int, default=0, help="write N photos to DST/heldout, the rest to DST/train")
    s.set_defaults(func=cmd_sample_photos)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
