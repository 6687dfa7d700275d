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
