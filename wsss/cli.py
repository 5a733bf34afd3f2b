"""The `wsss` command line: a thin Typer shell over the library API.

Every command maps onto one library function, so anything done here can be
done from Python (see docs/predict-export-api.md, "Python API").
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from wsss.config import load_config
from wsss.data.demo import DemoOptions  # cheap: the generators load NumPy, Pillow, SciPy on first use
from wsss.data.shapes import ShapesOptions
from wsss.errors import WsssError

app = typer.Typer(
    help="wsss: end-to-end weakly-supervised semantic segmentation (AFA + PAR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
config_app = typer.Typer(help="Inspect configurations; print their reference.", no_args_is_help=True)
data_app = typer.Typer(help="Build and convert datasets.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")

OVERRIDES = typer.Argument(None, help="config overrides, e.g. train.lr=1e-4 cam.scales=[1.0,0.5]", show_default=False)


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else ``wsss.__version__`` (a source checkout)."""
    from importlib import metadata

    try:
        return metadata.version("wsss")
    except metadata.PackageNotFoundError:
        from wsss import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"wsss {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_print_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """wsss: end-to-end weakly-supervised semantic segmentation (AFA + PAR)."""
    from wsss.logs import configure_logging

    configure_logging(rank=int(os.environ.get("RANK", "0") or 0))  # progress and warnings on stderr


def _is_override(arg: str) -> bool:
    """``section.key=value`` (an existing file of that name is not an override)."""
    return re.match(r"^[A-Za-z_]\w*\.[\w.]+=", arg) is not None and not Path(arg).exists()


def _split_overrides(args: Optional[List[str]]) -> tuple[List[str], List[str]]:
    """Positional arguments -> (inputs, section.key=value overrides)."""
    inputs, overrides = [], []
    for arg in args or []:
        (overrides if _is_override(arg) else inputs).append(arg)
    return inputs, overrides


def _config(name: str, overrides: Optional[List[str]], data_root: Optional[Path] = None,
            work_dir: Optional[Path] = None):
    extra = list(overrides or [])
    if data_root is not None:
        extra.append(f"data.root={data_root}")
    if work_dir is not None:
        extra.append(f"train.work_dir={work_dir}")
    return load_config(name, extra)


# --------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(
    name: str = typer.Argument(..., help="voc | coco | custom | demo, or a path to a YAML file"),
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Print the resolved configuration as YAML."""
    typer.echo(load_config(name, overrides or []).to_yaml(), nl=False)


@config_app.command("docs")
def config_docs(
    out: Optional[Path] = typer.Option(None, help="write the reference to this file instead of printing it"),
) -> None:
    """Print the configuration reference (docs/configuration.md): every key, type, default and meaning."""
    from wsss.config_docs import config_reference

    text = config_reference()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        typer.echo(f"configuration reference written to {out}")


# --------------------------------------------------------------------------- data


_DEMO = DemoOptions()  # the generator's defaults: `wsss data demo` shows them and repeats none


@data_app.command("demo")
def data_demo(
    out: Path = typer.Argument(..., help="output directory (custom VOC layout)"),
    seed: int = typer.Option(_DEMO.seed, help="random seed; the same seed gives the same dataset"),
    num_classes: int = typer.Option(_DEMO.num_classes, help="number of digit classes (1-10)"),
    image_size: int = typer.Option(_DEMO.image_size, help="image side in pixels"),
    num_train: int = typer.Option(_DEMO.num_train, help="training images"),
    num_val: int = typer.Option(_DEMO.num_val, help="validation images"),
    min_objects: int = typer.Option(_DEMO.objects_per_image[0], help="fewest digits per image"),
    max_objects: int = typer.Option(_DEMO.objects_per_image[1], help="most digits per image"),
    min_object_size: float = typer.Option(
        _DEMO.object_size[0], help="smallest digit side as a fraction of the image side (before stroke dilation)"),
    max_object_size: float = typer.Option(
        _DEMO.object_size[1], help="largest digit side as a fraction of the image side (before stroke dilation)"),
    texture: bool = typer.Option(_DEMO.texture, help="fill digits with a texture instead of a flat colour"),
    random_colours: bool = typer.Option(
        _DEMO.random_colours, help="random fill colour per digit instead of one per class"),
    grayscale: bool = typer.Option(_DEMO.grayscale, help="whole image in grey levels (3 equal channels)"),
) -> None:
    """Build the embedded demo dataset: real MNIST digits pasted on real photos."""
    from wsss.data.demo import build_demo_dataset

    path = build_demo_dataset(
        out, seed=seed, num_classes=num_classes, image_size=image_size, num_train=num_train, num_val=num_val,
        objects_per_image=(min_objects, max_objects), object_size=(min_object_size, max_object_size),
        texture=texture, random_colours=random_colours, grayscale=grayscale,
    )
    typer.echo(f"demo dataset written to {path}")


_SHAPES = ShapesOptions()


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Argument(..., help="output directory (custom VOC layout)"),
    seed: int = typer.Option(_SHAPES.seed, help="random seed; the same seed gives the same dataset"),
    num_classes: int = typer.Option(_SHAPES.num_classes, help="number of shape classes (1-10)"),
    image_size: int = typer.Option(_SHAPES.image_size, help="image side in pixels"),
    num_train: int = typer.Option(_SHAPES.num_train, help="training images"),
    num_val: int = typer.Option(_SHAPES.num_val, help="validation images"),
    min_objects: int = typer.Option(_SHAPES.objects_per_image[0], help="fewest shapes per image"),
    max_objects: int = typer.Option(_SHAPES.objects_per_image[1], help="most shapes per image"),
    min_object_size: float = typer.Option(_SHAPES.object_size[0], help="smallest shape side / image side"),
    max_object_size: float = typer.Option(_SHAPES.object_size[1], help="largest shape side / image side"),
    fills: str = typer.Option(",".join(_SHAPES.fills), help="fill kinds, comma-separated: flat, texture, photo"),
    background: str = typer.Option(_SHAPES.background, help="photo | noise | mixed"),
    occlusion: float = typer.Option(_SHAPES.occlusion, help="probability that a shape may hide part of others"),
    val_novel_fraction: float = typer.Option(
        _SHAPES.val_novel_fraction, help="share of val images drawn with geometry never seen in train"),
    class_cue: str = typer.Option(
        _SHAPES.class_cue, help="what tells the class: outline (its shape family) | fill (its hue; any shape)"),
) -> None:
    """Build the shapes dataset: random polygons, stars, rings, crosses, ... on photos (shares nothing with demo)."""
    from wsss.data.shapes import build_shapes_dataset

    path = build_shapes_dataset(
        out, seed=seed, num_classes=num_classes, image_size=image_size, num_train=num_train, num_val=num_val,
        objects_per_image=(min_objects, max_objects), object_size=(min_object_size, max_object_size),
        fills=tuple(f.strip() for f in fills.split(",") if f.strip()), background=background, occlusion=occlusion,
        val_novel_fraction=val_novel_fraction, class_cue=class_cue,
    )
    typer.echo(f"shapes dataset written to {path}")


@data_app.command("coco-masks")
def data_coco_masks(
    coco_root: Path = typer.Argument(..., help="COCO 2014 root with train2014/, val2014/, annotations/"),
    out: Path = typer.Argument(..., help="output root in the VOC-style layout"),
    splits: List[str] = typer.Option(["train", "val"], "--split", help="splits to convert"),
    copy: bool = typer.Option(False, help="copy images instead of symlinking them"),
) -> None:
    """Convert COCO instance annotations to VOC-style label PNGs (81 classes)."""
    from wsss.data.coco import convert_coco_masks

    path = convert_coco_masks(coco_root, out, splits=tuple(splits), copy_images=copy)
    typer.echo(f"COCO masks written to {path}")


# --------------------------------------------------------------------------- train


@app.command()
def train(
    config: Optional[str] = typer.Argument(
        None, help="voc | coco | custom | demo, or a path to a YAML file (default with --resume: the run's own)"),
    overrides: Optional[List[str]] = OVERRIDES,
    data_root: Optional[Path] = typer.Option(None, help="dataset root (sets data.root)"),
    work_dir: Optional[Path] = typer.Option(None, help="output directory (sets train.work_dir)"),
    resume: Optional[str] = typer.Option(
        None, help="continue a run exactly: 'auto' (the work dir's last.pt) or a checkpoint path"),
) -> None:
    """Train AFA end to end: CAM, PAR pseudo labels, affinity, random walk, segmentation."""
    from wsss.engine.trainer import train as run_training

    if config is not None and _is_override(config):  # only overrides were given: they are not a config name
        overrides, config = [config, *(overrides or [])], None
    if config is None:
        if resume is None:
            raise WsssError("give a config (voc | coco | custom | demo | FILE.yaml), or --resume to continue a run")
        cfg = _resumed_config(resume, overrides, data_root, work_dir)
    else:
        cfg = _config(config, overrides, data_root, work_dir)
    run_training(cfg, resume=resume)


def _resumed_config(resume: str, overrides: Optional[List[str]], data_root: Optional[Path],
                    work_dir: Optional[Path]):
    """The config saved in the checkpoint that ``--resume`` names (with overrides, data root and work dir)."""
    from wsss.engine.checkpoint import checkpoint_config, load_checkpoint
    from wsss.engine.run_files import resolve_resume

    if str(resume) == "auto" and work_dir is None:
        raise WsssError("--resume auto without a config needs --work-dir: the run to continue")
    path = resolve_resume(resume, work_dir or ".")
    extra = list(overrides or [])
    if data_root is not None:
        extra.append(f"data.root={data_root}")
    extra.append(f"train.work_dir={work_dir if work_dir is not None else path.parent}")
    return checkpoint_config(load_checkpoint(path), extra, f"'{path}'")


# --------------------------------------------------------------------------- pseudolabel


@app.command()
def pseudolabel(
    checkpoint: Path = typer.Option(..., help="a checkpoint written by `wsss train`"),
    split: Optional[str] = typer.Option(None, help="dataset split to label (default: the run's data.train_split)"),
    out: Optional[Path] = typer.Option(
        None, help="output directory (default: <checkpoint folder>/pseudo_labels/<split>_<method>)"),
    method: Optional[str] = typer.Option(None, help="cam | par | afa (default: afa for AFA, par for ToCo)"),
    msc: bool = typer.Option(True, help="multi-scale + flip CAMs"),
    crf: bool = typer.Option(False, help="refine with DenseCRF (needs pydensecrf2)"),
    save_probs: bool = typer.Option(False, help="also save class probabilities (.npy, float16)"),
    evaluate: bool = typer.Option(False, "--eval", help="report mIoU of the written labels against the split's masks"),
    data_root: Optional[Path] = typer.Option(None, help="dataset root (default: the checkpoint's)"),
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Write pseudo labels (VOC-palette PNGs) for a split; restartable and torchrun-aware."""
    from wsss.engine.inference import generate_pseudo_labels

    if method is not None and method not in ("cam", "par", "afa"):
        raise WsssError(f"--method must be one of cam, par, afa; got '{method}'")
    result = generate_pseudo_labels(
        checkpoint, split=split, out_dir=out, method=method, msc=msc, crf=crf, save_probs=save_probs,
        evaluate=evaluate, data_root=data_root, overrides=overrides or [],
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        typer.echo(f"wrote {result['written']} pseudo labels to {result['out_dir']} ({result['skipped']} already "
                   f"there, skipped) in {result['seconds']:.1f} s")
        if evaluate:
            from wsss.engine.metrics import format_table

            typer.echo(format_table(result))


# --------------------------------------------------------------------------- eval


def _float_list(text: Optional[str], option: str) -> List[float]:
    """"0.1,0.2" -> [0.1, 0.2]; None -> []."""
    if text is None:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise WsssError(f"{option} takes comma-separated numbers, e.g. 0.1,0.2,0.3; got '{text}'")
    return values


@app.command("eval")
def evaluate(
    pred: Optional[Path] = typer.Option(None, help="directory of label PNGs to score"),
    checkpoint: Optional[Path] = typer.Option(None, help="evaluate a checkpoint instead of a directory"),
    data_root: Optional[Path] = typer.Option(None, help="dataset root (required with --pred)"),
    split: str = typer.Option("val", help="dataset split"),
    target: str = typer.Option("seg", help="with --checkpoint: seg | cam | par | afa"),
    msc: bool = typer.Option(False, help="with --checkpoint: multi-scale + flip (eval.scales; cam.scales for a CAM "
                             "target)"),
    crf: bool = typer.Option(False, help="with --checkpoint: DenseCRF post-processing"),
    save: Optional[Path] = typer.Option(None, help="with --checkpoint: write predictions here (VOC server layout for test)"),
    dataset: Optional[str] = typer.Option(None, help="with --pred: voc | coco | custom (default: guessed from the root)"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="also write the metrics as JSON"),
    bg_thresholds: Optional[str] = typer.Option(
        None, help="with --checkpoint and a CAM target: comma-separated background scores to sweep in place of "
        "cam.bg_threshold_eval (e.g. 0.1,0.2,0.3,0.45); one CAM pass, the mIoU at each, the best one's table"),
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """mIoU (one accumulated confusion matrix, 255 ignored), per-class IoU and pixel accuracy."""
    if (pred is None) == (checkpoint is None):
        raise WsssError("give exactly one of --pred DIR or --checkpoint FILE")
    from wsss.engine.metrics import format_table, to_json

    if pred is not None:
        from wsss.engine.evaluation import evaluate_prediction_dir

        if data_root is None:
            raise WsssError("--pred needs --data-root: the dataset whose masks are the ground truth")
        result = evaluate_prediction_dir(pred, data_root, split=split, dataset=dataset)
    else:
        from wsss.engine.inference import EVAL_TARGETS, evaluate_checkpoint

        if target not in EVAL_TARGETS:
            raise WsssError(f"--target must be one of {', '.join(EVAL_TARGETS)}; got '{target}'")
        result = evaluate_checkpoint(
            checkpoint, split=split, target=target, msc=msc, crf=crf, save_dir=save, data_root=data_root,
            overrides=overrides or [], bg_thresholds=_float_list(bg_thresholds, "--bg-thresholds"),
        )
    # None: e.g. the test split (predictions written, no ground truth); under torchrun only rank 0 reports.
    if result is None or int(os.environ.get("RANK", "0")) != 0:
        return
    if "sweep" in result:
        from wsss.engine.metrics import format_sweep

        typer.echo(format_sweep(result))
    typer.echo(format_table(result))
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(to_json(result) + "\n")


# --------------------------------------------------------------------------- viz


@app.command()
def viz(
    checkpoint: Path = typer.Option(..., help="a checkpoint written by `wsss train`"),
    args: Optional[List[str]] = typer.Argument(
        None, help="image files (instead of --split) and section.key=value overrides", show_default=False),
    split: Optional[str] = typer.Option(None, help="dataset split to visualize (instead of IMAGE ...)"),
    limit: int = typer.Option(16, help="with --split: the first N images (0 = all)"),
    out: Path = typer.Option(..., help="output directory for the PNG panels and index.html"),
    data_root: Optional[Path] = typer.Option(None, help="dataset root (default: the checkpoint's)"),
) -> None:
    """One PNG panel per image (CAMs, PAR and random-walk labels, affinities, prediction) and an HTML index."""
    overrides = [a for a in args or [] if "=" in a]
    images = [Path(a) for a in args or [] if "=" not in a]
    if (split is None) == (not images):
        raise WsssError("give either --split SPLIT or one or more IMAGE files")
    from wsss.engine.viz import visualize

    index = visualize(checkpoint, out_dir=out, split=split, images=images, limit=limit,
                      data_root=data_root, overrides=overrides)
    typer.echo(f"panels and index written to {index}")


# --------------------------------------------------------------------------- predict and export


PREDICT_HELP = (
    "Segment image files: one VOC-palette label PNG per image, at its original size.\n\n"
    "Images are prepared as `wsss eval --checkpoint` prepares a split (long side eval.long_side, data.mean / "
    "data.std) and run on train.device with train.precision of the model's config (override them as "
    "section.key=value). New images have no image labels: --target cam and afa use the classes the classifier "
    "predicts (sigmoid of the class logits of the scale-1 pass > 0.5, else the top class).\n\n"
    "An unreadable image gives one 'error:' line and is skipped; the others are written and the exit code is 1. "
    "Ends with a summary: images written, classes found with their pixel counts, time."
)


@app.command(help=PREDICT_HELP)
def predict(
    checkpoint: Path = typer.Option(..., help="a checkpoint (`wsss train`) or a model folder (`wsss export`)"),
    args: List[str] = typer.Argument(
        ..., help="images: files, directories (their images, sorted, not recursive) or quoted globs ('**' "
        "recurses); and section.key=value overrides", show_default=False, metavar="INPUT"),
    out: Path = typer.Option(..., help="output directory: <name>.png label maps (VOC palette, original size)"),
    overlay: bool = typer.Option(False, help="also write <out>/overlay/<name>.png: the labels blended on the image"),
    probs: bool = typer.Option(False, help="also write <out>/<name>.npz: class probabilities, key 'probs', "
                               "float16 [C, H, W]"),
    msc: bool = typer.Option(False, help="multi-scale test: eval.scales for seg, cam.scales for cam/afa"),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="average with the mirrored image "
                                        "(default: as eval.flip, or cam.flip, say with --msc; none without)",
                                        show_default=False),
    crf: bool = typer.Option(False, help="DenseCRF post-processing (eval.crf_*; needs pydensecrf2)"),
    target: str = typer.Option("seg", help="seg (segmentation head) | cam | afa (CAMs of the predicted classes)"),
    batch_size: int = typer.Option(1, help="images read per loader step; the network still runs one image at "
                                   "a time (sizes differ, so they cannot be stacked)"),
    workers: Optional[int] = typer.Option(None, help="processes reading and resizing the next images while the "
                                          "network runs (default: data.num_workers)", show_default=False),
) -> None:
    """Segment image files: one VOC-palette label PNG per image, at its original size (help: PREDICT_HELP)."""
    from wsss.engine.predict import format_summary, predict_images

    inputs, overrides = _split_overrides(args)
    if not inputs:
        raise WsssError("give one or more images (files, directories or globs) to segment")
    if target not in ("seg", "cam", "afa"):
        raise WsssError(f"--target must be one of seg, cam, afa; got '{target}'")
    summary = predict_images(
        checkpoint, inputs, out, overlay=overlay, probs=probs, msc=msc, flip=flip, crf=crf, target=target,
        batch_size=batch_size, num_workers=workers, overrides=overrides,
    )
    typer.echo(format_summary(summary))
    if summary["failed"]:
        raise typer.Exit(code=1)


@app.command()
def export(
    checkpoint: Path = typer.Option(..., help="a checkpoint written by `wsss train`"),
    out_dir: Path = typer.Argument(..., help="the model folder to write (new, empty, or an earlier export)"),
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Write a self-contained model folder (model.safetensors, config.yaml, classes.json, README.md); no pickle."""
    from wsss.engine.export import export_model

    path = export_model(checkpoint, out_dir, overrides=overrides or [])
    typer.echo(f"model exported to {path}")


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    work_dir: Path = typer.Option(Path("work_dirs/demo"), help="where the run writes everything"),
    data_dir: Path = typer.Option(Path("data/demo"), help="the demo dataset (built here if missing)"),
    pretrained: Optional[str] = typer.Option(None, help="start from these weights (hub name or file) instead of scratch"),
    method: str = typer.Option("afa", help="the method: afa (configs/demo.yaml) or toco (configs/demo-toco.yaml)"),
    overrides: Optional[List[str]] = OVERRIDES,
) -> None:
    """Build the demo data, train from scratch, pseudo-label, evaluate, print one table."""
    from wsss.engine.demo import format_demo_table, run_demo

    if work_dir == Path("work_dirs/demo") and method != "afa":
        work_dir = Path(f"work_dirs/demo-{method}")  # the default folder of each method: a run is not resumed as another
    result = run_demo(work_dir=work_dir, data_dir=data_dir, pretrained=pretrained, overrides=overrides or [],
                      method=method)
    typer.echo(format_demo_table(result))


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except WsssError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
