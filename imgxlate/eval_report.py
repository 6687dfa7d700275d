"""What ``imgxlate eval`` writes: one function per task that scores a model (imgxlate.evaluate), prints
its table and, with ``out``, saves per-image CSV and Parquet, a summary.json and the pictures
(imgxlate.plots) under a folder or s3:// prefix.

Apart from imgxlate.evaluate because training validation imports that on every worker: measuring stays
free of the report's formats (pyarrow, matplotlib) and of the console.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass

from imgxlate import evaluate, metrics, plots
from imgxlate.errors import CannotRun, one_line
from imgxlate.io import storage


class EvalError(CannotRun, ValueError):
    """The evaluation cannot run (no images, the wrong kind of model, a missing style image)."""


@dataclass
class SrEval:
    """``imgxlate eval sr``: PSNR/SSIM next to bicubic under the standard SR protocol."""
    model: str                             # artifact path/URI, shipped name, or 'bicubic'
    data: str                              # HR images
    scale: int
    rgb: bool = False                      # RGB PSNR/SSIM instead of the Y channel
    ensemble: bool = False                 # EDSR's 8-way geometric self-ensemble
    out: str | None = None
    degradations: str = "none"             # a preset of imgxlate.degrade, applied to each LR image
    seed: int = 0
    sheet: int = 6                         # images on the before/after sheet (0: none)
    crop: int = 160                        # sheet crop side in HR pixels
    tile: int | None = None                # as translate's
    overlap: int = 32
    amp: str = "auto"                      # as translate's (imgxlate.infer.precision)
    compile: bool = False


@dataclass
class SegEval:
    """``imgxlate eval seg``: Dice / IoU / accuracy, overlays and the worst images."""
    model: str
    data: str
    split: str = "all"                     # 'all', or the run's held-out 'val' / its 'train' groups
    size: int | None = None                # override the contract's input size
    worst: int = 8
    overlays: str = "worst"                # 'worst' or 'all'
    out: str | None = None
    tile: int | None = None
    overlap: int = 32
    amp: str = "auto"
    compile: bool = False


@dataclass
class StyleEval:
    """``imgxlate eval style``: content and per-layer style losses of one or more style models."""
    model: list[str]
    data: str                              # held-out content images
    style: str | None = None               # default: the style image each model was trained with
    size: int | None = None                # default: the training content size
    style_size: int | None = None          # default: the training run's
    vgg_weights: str = "imagenet"
    out: str | None = None
    tile: int | None = None
    overlap: int = 32
    amp: str = "auto"
    compile: bool = False


def save(out: str, name: str, rows: list[dict], summary: dict) -> None:
    """Per-image rows as CSV and Parquet plus a summary.json, under the ``out`` folder (path or URI)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    storage.write_bytes(storage.join(out, f"{name}.csv"), text.getvalue().encode())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(storage.join(out, f"{name}.parquet"), buf.getvalue())
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=2).encode())


def flat(row) -> dict:
    """A result row's scalar fields (its crops and pictures left out): one CSV / Parquet row."""
    return {k: v for k, v in dataclasses.asdict(row).items() if k not in ("crop", "pictures", "terms")}


def predictor(model: str, cfg, task: str, scale=None, **options):
    """The batch job's Predictor for ``model``, with the options eval shares with translate (tiles, precision,
    compile); prints the precision it runs at and why."""
    from imgxlate.infer.precision import PrecisionError
    from imgxlate.infer.predictor import PredictOptions, Predictor

    try:
        pred = Predictor(model, scale, options=PredictOptions(tile=cfg.tile, overlap=cfg.overlap, amp=cfg.amp,
                                                              compile=cfg.compile, **options))
    except (PrecisionError, ValueError) as e:           # ValueError: a scale or tile the model cannot take
        raise EvalError(str(e)) from None
    except CannotRun:
        raise
    except Exception as e:                              # a model that cannot be read (e.g. s3:// unreachable)
        raise EvalError(f"model {model}: {type(e).__name__}: {one_line(e)}") from None
    if pred.model.task != task:
        raise EvalError(f"{model} is a {pred.model.task} model; eval {task} scores {task} models")
    print(f"precision: {pred.precision} ({pred.precision_reason})")
    return pred


# ------------------------------------------------------------------------------------------------ SR
def sr(cfg: SrEval) -> None:
    pred = predictor(cfg.model, cfg, "sr", cfg.scale, ensemble=cfg.ensemble)
    rows = evaluate.eval_sr(pred, evaluate.read_named(cfg.data, exclude=cfg.out), cfg.scale, y_channel=not cfg.rgb,
                            crop=cfg.crop if cfg.sheet else 0, degradations=cfg.degradations, seed=cfg.seed)
    if not rows:
        raise EvalError(f"no images under {cfg.data}")
    protocol = metrics.PROTOCOL_RGB if cfg.rgb else metrics.PROTOCOL_Y
    name = getattr(pred.model, "meta", {}).get("model_id", cfg.model) + ("+ensemble" if cfg.ensemble else "")
    print(f"x{cfg.scale}  model={name}  protocol: {protocol}"
          + (f"  LR degraded: {cfg.degradations} (seed {cfg.seed})" if cfg.degradations != "none" else ""))
    print(f"{'image':<28}{'size':>11}{'PSNR':>9}{'SSIM':>8}{'bic PSNR':>10}{'bic SSIM':>10}")
    for r in rows:
        print(f"{r.image:<28}{r.width:>5}x{r.height:<5}{r.psnr:>9.2f}{r.ssim:>8.4f}"
              f"{r.psnr_bicubic:>10.2f}{r.ssim_bicubic:>10.4f}")
    mean = evaluate.mean_of(rows, ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic"))
    print(f"{'mean (' + str(len(rows)) + ' images)':<39}{mean['psnr']:>9.2f}{mean['ssim']:>8.4f}"
          f"{mean['psnr_bicubic']:>10.2f}{mean['ssim_bicubic']:>10.4f}")
    if not cfg.out:
        return
    common = {"scale": cfg.scale, "protocol": protocol, "model": name, "ensemble": cfg.ensemble,
              "degradations": cfg.degradations, "seed": cfg.seed, "precision": pred.precision}
    save(cfg.out, f"sr_x{cfg.scale}", [{**flat(r), **common} for r in rows],
         {**common, "data": cfg.data, "images": len(rows), "mean": mean,
          "contract": pred.contract.to_dict(), "tile": pred.options.tile, "precision": pred.precision,
          "precision_reason": pred.precision_reason})
    print(f"per-image results: {storage.join(cfg.out, f'sr_x{cfg.scale}.csv')} (and .parquet, summary.json)")
    if cfg.sheet:
        sheet = storage.join(cfg.out, f"sheet_x{cfg.scale}.png")
        storage.write_bytes(sheet, plots.sr_sheet(rows[:cfg.sheet], cfg.scale, protocol, name))
        print(f"before/after sheet: {sheet}")


# ----------------------------------------------------------------------------------------------- seg
def seg(cfg: SegEval) -> None:
    pred = predictor(cfg.model, cfg, "seg")
    model = pred.model
    if cfg.size:
        pred.contract = dataclasses.replace(pred.contract, size=cfg.size)
    trained = evaluate.training_seg_settings(getattr(model, "meta", {}))
    pairs = evaluate.seg_pairs(cfg.data, cfg.split, **trained, exclude=cfg.out)
    rows = evaluate.eval_seg(pred, evaluate.read_seg_samples(pairs, root=cfg.data))
    if not rows:
        raise EvalError(f"no image/mask pairs under {cfg.data} (split {cfg.split})")
    name = model.meta["model_id"]
    mean = evaluate.mean_of(rows, ("dice", "iou", "accuracy"))
    print(f"model={name}  split={cfg.split}  input: {pred.contract.describe()}; scored at the mask's resolution")
    worst = sorted(rows, key=lambda r: r.dice)[:cfg.worst]
    print(f"{'image':<36}{'Dice':>8}{'IoU':>8}{'acc':>8}{'fg':>7}   (worst {len(worst)})")
    for r in worst:
        print(f"{r.image:<36}{r.dice:>8.4f}{r.iou:>8.4f}{r.accuracy:>8.4f}{r.foreground:>7.3f}")
    print(f"{'mean (' + str(len(rows)) + ' images)':<36}"
          f"{mean['dice']:>8.4f}{mean['iou']:>8.4f}{mean['accuracy']:>8.4f}")
    if not cfg.out:
        return
    common = {"model": name, "split": cfg.split, "size": pred.contract.size or 0, "precision": pred.precision}
    save(cfg.out, "seg", [{**flat(r), **common} for r in rows],
         {**common, "data": cfg.data, "images": len(rows), "mean": mean,
          "contract": pred.contract.to_dict(), "worst": [r.image for r in worst]})
    shown = rows if cfg.overlays == "all" else worst
    for r in shown:
        stem = r.image.rsplit(".", 1)[0].replace("/", "__")
        storage.write_bytes(storage.join(cfg.out, "overlays", f"{stem}.png"), plots.seg_panel(r))
    if worst:
        storage.write_bytes(storage.join(cfg.out, "worst.png"),
                            plots.seg_sheet(worst, f"{name}: the {len(worst)} lowest-Dice images"))
    print(f"results in {cfg.out}: seg.csv/.parquet, summary.json, worst.png, {len(shown)} overlays/*.png")


# --------------------------------------------------------------------------------------------- style
def style(cfg: StyleEval) -> None:
    """Each model in turn, against the style image it was trained with (or ``cfg.style``)."""
    from imgxlate.io.images import read_rgb

    if cfg.style and len(cfg.model) > 1:
        raise EvalError("--style overrides the style image of one model only; give one --model with it")
    images = evaluate.read_named(cfg.data, read_rgb, exclude=cfg.out)
    if not images:
        raise EvalError(f"no images under {cfg.data}")
    for spec in cfg.model:
        _style_model(cfg, spec, images)


def _style_model(cfg: StyleEval, spec: str, images: list[evaluate.Named]) -> None:
    from imgxlate.io.images import read_rgb
    from imgxlate.losses import style_size_of

    pred = predictor(spec, cfg, "style")
    run = pred.model.meta.get("provenance", {}).get("config", {})
    style_uri = cfg.style or run.get("style_image")
    if not style_uri:
        raise EvalError(f"{spec} does not record its style image: pass --style")
    try:
        style_image = read_rgb(style_uri)
    except (OSError, ValueError) as e:      # the path its training recorded, on another machine: gone
        raise EvalError(f"the style image {style_uri} cannot be read ({type(e).__name__}: {e})"
                        + ("" if cfg.style else f": it is the one {spec}'s training recorded; pass --style")) from None
    size = cfg.size or run.get("content_size", 256)
    style_size = cfg.style_size or style_size_of(run)       # as the run computed its Gram targets
    rows = evaluate.eval_style(pred, images, style_image, size=size, vgg_weights=cfg.vgg_weights,
                               content_weight=run.get("content_weight", 1e4), style_size=style_size)
    name = pred.model.meta["model_id"]
    terms = list(rows[0].terms)
    print(f"model={name}  style={style_uri} at {style_size or 'full'} px  losses on the centre {size} px square"
          f"  vgg={cfg.vgg_weights} (lower is better)")
    print(f"{'image':<28}{'loss':>10}" + "".join(f"{t:>12}" for t in terms))
    for r in rows:
        print(f"{r.image:<28}{r.loss:>10.4g}" + "".join(f"{r.terms[t]:>12.4g}" for t in terms))
    mean = {"loss": sum(r.loss for r in rows) / len(rows),
            **{t: sum(r.terms[t] for r in rows) / len(rows) for t in terms}}
    print(f"{'mean':<28}{mean['loss']:>10.4g}" + "".join(f"{mean[t]:>12.4g}" for t in terms))
    if not cfg.out:
        return
    out = storage.join(cfg.out, name)
    common = {"model": name, "style": style_uri, "size": size, "vgg_weights": cfg.vgg_weights}
    save(out, "style", [{"image": r.image, "loss": r.loss, **r.terms, **common} for r in rows],
         {"style": style_uri, "size": size, "style_size": style_size, "images": len(rows), "mean": mean})
    grid = storage.join(cfg.out, f"grid-{name}.png")
    storage.write_bytes(grid, plots.style_grid(rows, style_image, f"{name}: content | stylised (as the batch job "
                                                                  f"writes them)"))
    print(f"results in {out}; grid {grid}")


TASKS = {"sr": (SrEval, sr), "seg": (SegEval, seg), "style": (StyleEval, style)}
