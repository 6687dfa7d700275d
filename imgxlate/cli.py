"""The ``imgxlate`` command line: each command parses its arguments (imgxlate.flags) into the library's
config dataclass, whose fields are the flags' names, calls the library and prints; imgxlate.guard gives
every command the same error lines and exit statuses.

    imgxlate translate SRC DST --model M     the batch job (imgxlate.infer.job)
    imgxlate train sr|style|seg DATA ...     Ray Train (imgxlate.train.run)
    imgxlate eval sr|seg|style ...           quality under the standard protocols (imgxlate.eval_report)
    imgxlate verify DST [--checksums] [--redo]   prove a run complete from its manifest (imgxlate.infer.verify)
    imgxlate report RUN | lr-find | models | info | sample-photos
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from imgxlate.flags import add_train_arguments, add_translate_arguments, build_parser  # noqa: F401 (jobs/, tests)
from imgxlate.guard import guarded
from imgxlate.log import log


def config_from(cls, args: argparse.Namespace, **values):
    """The dataclass ``cls`` from the parsed arguments named as its fields (a flag's ``dest`` is its field),
    plus ``values`` for the fields built otherwise; the fields no flag gives keep their defaults. A new
    field needs a flag, no line here."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **values})


# ----------------------------------------------------------------------------------------- translate
def translate_config(args):
    from imgxlate.infer.config import TranslateConfig

    return config_from(TranslateConfig, args)


def run_translate(args) -> int:
    """Through the Python API (imgxlate.api), as a user's own code calls it."""
    from imgxlate import api

    try:
        api.run(translate_config(args))
    except api.InputsFailed as e:
        print(f"imgxlate translate: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_translate(args) -> int:
    """`imgxlate translate` through the mask (jobs/translate.py calls it with its own parser's arguments)."""
    return guarded("translate", run_translate, args)


def run_verify(args) -> int:
    """Exit 1 (with one line) when DST has problems: verify is a check, and a failed check is not a crash."""
    from imgxlate.infer import verify

    result = verify.verify(config_from(verify.VerifyConfig, args))
    print(verify.report(result))
    line = verify.verdict(result)
    if line:
        print(line, file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------- train
MODEL_FLAG = {"sr": "scale", "seg": "encoder_weights", "style": "norm"}   # a model setting (--model-config wins)
FLAG_DEFAULT = {"encoder_weights": "imagenet", "norm": "instance", "scale": 2}   # without --init (its model's own)


def train_config(args, task: str):
    from imgxlate.train.loop import LoopConfig
    from imgxlate.train.run import parse_stages
    from imgxlate.train.tasks import DataError, RunConfig

    try:
        model = json.loads(args.model_config)
    except ValueError as e:
        raise DataError(f"--model-config {args.model_config!r} is not JSON ({e})") from None
    if not isinstance(model, dict):
        raise DataError(f"--model-config {args.model_config!r}: give a JSON object, e.g. '{{\"nf\": 64}}'")
    if not args.name or args.name in (".", "..") or "/" in args.name or "\\" in args.name:
        raise DataError(f"--name {args.name!r}: a run's name is one folder name under --storage (no '/')")
    flag = MODEL_FLAG[task]
    value = getattr(args, flag)
    if value is None and not getattr(args, "init", None):
        value = FLAG_DEFAULT.get(flag)
    if value is None and task == "sr" and getattr(args, "init", None) and not getattr(args, "stages", None):
        value = _init_scale(args.init)       # --init sr-x4 trains at x4 unless told another --scale
    if value is not None:
        model.setdefault(flag, value)
    cpus = args.cpus_per_worker if args.cpus_per_worker is not None else (4.0 if args.use_gpu else 1.0)
    return config_from(RunConfig, args, task=task, model=model, loop=config_from(LoopConfig, args),
                       stages=parse_stages(task, getattr(args, "stages", None)), cpus_per_worker=cpus)


def _init_scale(init: str) -> int | None:
    """The scale of the SR model --init names (None when it cannot be read here: the run's own check says why)."""
    from imgxlate.infer.predictor import model_meta

    try:
        scale = model_meta(init).get("scale")
    except Exception:
        return None
    return int(scale) if isinstance(scale, (int, float)) and float(scale).is_integer() else None


def cmd_train(args) -> int:
    from imgxlate.train.run import train

    train(train_config(args, args.task), ray_address=args.ray_address, wait_for_resources=args.wait_for_resources)
    return 0


def cmd_lr_find(args) -> int:
    import torch

    from imgxlate import plots
    from imgxlate.io import storage
    from imgxlate.train import tasks
    from imgxlate.train.lr_find import lr_find

    if args.start_lr >= args.end_lr:
        raise tasks.DataError(f"--start-lr {args.start_lr:g} must be below --end-lr {args.end_lr:g}")
    cfg = train_config(args, args.task)
    task = tasks.task_of(cfg)
    stage = task.stages(cfg)[0]
    task.check(cfg)
    model, _ = task.build_model(cfg, stage, None)
    td = task.stage_data(cfg, stage, "cpu")
    loader = torch.utils.data.DataLoader(td.train, batch_size=cfg.batch_size, shuffle=True)
    lrs, losses, suggestion = lr_find(model, td.objective, loader, args.start_lr, args.end_lr, args.steps)
    storage.write_bytes(args.plot, plots.lr_find_plot(lrs, losses, suggestion))
    print(f"suggested lr: {suggestion:.3e} (for a batch of {cfg.batch_size}); plot: {args.plot}")
    return 0


# --------------------------------------------------------------------------------------- eval, report
def cmd_eval(args) -> int:
    from imgxlate import eval_report

    config, evaluate = eval_report.TASKS[args.what]
    evaluate(config_from(config, args))
    return 0


def cmd_report(args) -> int:
    from imgxlate import report

    text, written = report.write(args.run, args.out, slowest=args.slowest)
    print(text)
    if written:
        log(f"report written to {written}")
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
    from imgxlate.artifact import ArtifactError
    from imgxlate.errors import CannotRun, one_line
    from imgxlate.infer.predictor import model_meta

    try:
        meta = model_meta(args.model)
    except CannotRun:
        raise
    except Exception as e:              # e.g. an s3:// artifact that cannot be reached, a damaged .pth
        raise ArtifactError(f"{args.model}: {type(e).__name__}: {one_line(e)}") from None
    print(json.dumps(meta, indent=2))
    if meta.get("format") == "spandrel":
        print(f"{meta['architecture']} x{meta['scale']:g}, {meta['n_params']:,} parameters, licence: {meta['licence']}")
    return 0


def cmd_sample_photos(args) -> int:
    from imgxlate.errors import CannotRun
    from imgxlate.io import storage
    from imgxlate.samples import HELD_OUT, write_sample_photos

    if not storage.is_local(args.dst) or os.path.isfile(storage.local_path(args.dst)):
        raise CannotRun(f"{args.dst}: sample-photos writes into a local folder")
    args.dst = storage.local_path(args.dst)     # file:, file://, ~
    if args.holdout > len(HELD_OUT):
        raise CannotRun(f"--holdout {args.holdout}: at most {len(HELD_OUT)} of the photos are held out "
                        f"({', '.join(HELD_OUT)})")
    paths = write_sample_photos(args.dst, max_side=args.max_side, holdout=args.holdout)
    print(f"wrote {len(paths)} sample photos (scikit-image's data set) to {args.dst}")
    return 0


# ---------------------------------------------------------------------------------------------- main
HANDLERS = {"translate": run_translate, "verify": run_verify, "train": cmd_train, "lr-find": cmd_lr_find,
            "eval": cmd_eval, "report": cmd_report, "models": cmd_models, "info": cmd_info,
            "sample-photos": cmd_sample_photos}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(args.command, HANDLERS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
