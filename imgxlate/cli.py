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
def cmd_eval_sr(args) -> int:
    from imgxlate import metrics
    from imgxlate.evaluate import eval_sr
    from imgxlate.infer.predictor import resolve_model

    model = resolve_model(args.model, args.scale)
    rows = eval_sr(model, args.data, args.scale, y_channel=not args.rgb)
    if not rows:
        print(f"no images under {args.data}", file=sys.stderr)
        return 2
    protocol = metrics.PROTOCOL_RGB if args.rgb else metrics.PROTOCOL_Y
    name = getattr(model, "meta", {}).get("model_id", args.model)
    print(f"x{args.scale}  model={name}  protocol: {protocol}")
    print(f"{'image':<28}{'size':>11}{'PSNR':>9}{'SSIM':>8}{'bic PSNR':>10}{'bic SSIM':>10}")
    for r in rows:
        print(f"{r.image:<28}{r.width:>5}x{r.height:<5}{r.psnr:>9.2f}{r.ssim:>8.4f}"
              f"{r.psnr_bicubic:>10.2f}{r.ssim_bicubic:>10.4f}")
    mean = {f: sum(getattr(r, f) for r in rows) / len(rows) for f in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic")}
    print(f"{'mean (' + str(len(rows)) + ' images)':<39}{mean['psnr']:>9.2f}{mean['ssim']:>8.4f}"
          f"{mean['psnr_bicubic']:>10.2f}{mean['ssim_bicubic']:>10.4f}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*dataclasses.asdict(rows[0]), "scale", "protocol", "model"])
            w.writeheader()
            for r in rows:
                w.writerow({**dataclasses.asdict(r), "scale": args.scale, "protocol": protocol, "model": name})
        print(f"per-image results: {args.out}")
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
    rs.add_argument("--ray-address", help="Ray cluster to join (default: start Ray locally)")
    rs.add_argument("--num-cpus", type=int, help="logical CPUs when Ray is started locally (default: all)")
    rs.add_argument("--actors", type=int, help="model actors (default: one per GPU, else 1)")
    rs.add_argument("--gpus-per-actor", type=float, help="GPUs per model actor (default: 1 if the cluster has GPUs)")
    rs.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per model actor (default 1)")
    rs.add_argument("--io-cpus", type=float, default=0.25, help="CPUs per read/decode or encode/write task")
    rs.add_argument("--batch-size", type=int, default=8, help="images per model-actor call (default 8)")
    rs.add_argument("--tile", type=int, default=512, help="tile side in input pixels for large images")
    rs.add_argument("--overlap", type=int, default=32, help="tile overlap in input pixels")
    rs.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"], help="autocast on GPU")
    run = p.add_argument_group("run")
    run.add_argument("--dry-run", action="store_true", help="list and count inputs, estimate output size, stop")
    run.add_argument("--fail-on-error", action="store_true", help="exit 1 when any input failed")
    run.add_argument("--run-id", help="name for this run's manifest folder (default: time + random)")


def translate_config(args):
    from imgxlate.infer.job import TranslateConfig

    return TranslateConfig(
        src=args.src, dst=args.dst, model=args.model, scale=args.scale, suffix=args.suffix, format=args.format,
        quality=args.quality, extensions=tuple(e.strip() for e in args.extensions.split(",") if e.strip()),
        limit=args.limit, max_pixels=args.max_pixels, tile=args.tile, overlap=args.overlap, amp=args.amp,
        cutout=args.cutout, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size, io_cpus=args.io_cpus,
        ray_address=args.ray_address, num_cpus=args.num_cpus, s3_endpoint=args.s3_endpoint,
        run_id=args.run_id, dry_run=args.dry_run, fail_on_error=args.fail_on_error)


def cmd_translate(args) -> int:
    from imgxlate.infer import job

    try:
        summary = job.run(translate_config(args))
    except job.JobError as e:
        print(f"imgxlate translate: error: {e}", file=sys.stderr)
        return 2
    if args.fail_on_error and summary.get("failed"):
        print(f"imgxlate translate: {summary['failed']} inputs failed (see the manifest)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------ models / info
def cmd_models(args) -> int:
    from imgxlate.models import PRESETS, REGISTRY

    for arch, (cfg_cls, model_cls) in REGISTRY.items():
        doc = (model_cls.__doc__ or sys.modules[model_cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{arch:<15}task={model_cls.task:<6}{doc}")
        print(f"{'':<15}config: {dataclasses.asdict(cfg_cls())}")
        for name, cfg in PRESETS.get(arch, {}).items():
            print(f"{'':<15}preset {name}: {dataclasses.asdict(cfg)}")
    return 0


def cmd_info(args) -> int:
    from imgxlate.models import read_meta

    print(json.dumps(read_meta(args.model), indent=2))
    return 0


def cmd_sample_photos(args) -> int:
    from imgxlate.samples import write_sample_photos

    paths = write_sample_photos(args.dst, max_side=args.max_side)
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
    sr.add_argument("--out", help="write per-image results to this CSV file")
    sr.set_defaults(func=cmd_eval_sr)

    m = sub.add_parser("models", help="list model families, configs and presets")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("info", help="print a model artifact's config.json")
    i.add_argument("model", help="artifact path/URI")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("sample-photos", help="write scikit-image's sample photos to a folder (for demos)")
    s.add_argument("dst")
    s.add_argument("--max-side", type=int, default=None, help="downscale photos larger than this")
    s.set_defaults(func=cmd_sample_photos)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
