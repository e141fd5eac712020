"""The commands that advise, run the whole job, compare runs and export models: advise,
demo, compare, export-model."""
from __future__ import annotations

from pathlib import Path

import click

from .common import (SEED, backbone_value, cache_dir_option, device_options, emit, handle_errors,
                     json_option, log, resolve_cache_dir, show_progress)


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", "-b", default="lite0", show_default=True, callback=backbone_value)
@click.option("--sample", type=click.IntRange(min=10), default=240, show_default=True,
              help="Images decoded to estimate similarity (stratified; the rest are only counted).")
@click.option("--large-per-class", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Median training images per class from which a dataset counts as large.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--run", "run_plan", is_flag=True, help="Execute the recommended commands, then compare.")
@device_options
@cache_dir_option
@json_option
@handle_errors
def advise(data_dir, backbone, sample, large_per_class, seed, run_plan, device, precision, cache_dir,
           as_json):
    """Say which of the four transfer-learning scenarios DATA_DIR is in, and what to run."""
    from ..advice import advise as run_advise

    a = run_advise(data_dir, backbone=backbone, sample=sample, large_per_class=large_per_class,
                   seed=seed, device=device, precision=precision,
                   progress=show_progress(as_json))
    d = a.to_dict()
    if run_plan:
        from ..plan import run_plan as execute

        d["plan"] = execute(a, cache_dir=resolve_cache_dir(cache_dir), device=device,
                            precision=precision, seed=seed, log=log)

    def human(d):
        s, m = d["size"], d["similarity"]
        lines = [f"Scenario {d['scenario']}: {d['size']['category']} and {m['category']}",
                 f"  size        {s['train_images']} training images, {s['classes']} classes, "
                 f"median {s['images_per_class_median']:.0f}/class (min {s['images_per_class_min']}, "
                 f"imbalance {s['imbalance']:.1f}x); large from {s['large_per_class']}/class",
                 f"  similarity  {m['score']:.2f}"
                 + (f" [95% {m['score_ci95'][0]:.2f}-{m['score_ci95'][1]:.2f}]" if m.get("score_ci95") else "")
                 + f" (similar from {m['similar_at']}) on {m['sample']} sampled images:",
                 f"              linear probe on frozen features {m['probe_accuracy_features']:.3f} vs raw "
                 f"pixels {m['probe_accuracy_pixels']:.3f} (chance {m['chance']:.2f})"]
        if "imagenet_familiarity" in m:
            tops = ", ".join(f"{c.split(',')[0]} ({n})" for c, n in m["imagenet_top_predictions"])
            lines.append(f"              ImageNet familiarity {m['imagenet_familiarity']:.2f} "
                         f"(mean top-1 softmax {m['imagenet_mean_max_softmax']:.2f}; top: {tops})")
        lines += ["", d["explanation"], "", "Next:"] + [f"  {c}" for c in d["commands"]]
        if d.get("plan"):
            from ..report.comparison import format_table

            plan = d["plan"]
            lines += ["", "Ran the plan:"] + [f"  {r}" for r in plan.get("summary", [])[:-1]]
            lines += ["", format_table(plan["compare"]["rows"], paired=plan["compare"]["paired"]),
                      "", plan["verdict"]["text"]]
        return "\n".join(lines)

    emit(d, as_json, human)


@click.command()
@click.option("--per-class", type=click.IntRange(min=8), default=60, show_default=True,
              help="Digits per class (10 classes).")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Epochs of the short fine-tune.")
@click.option("--image-size", type=click.IntRange(min=32), default=128, show_default=True,
              help="Input side of a fine-tune from a zero classifier (small keeps it quick on a CPU); "
                   "the digits land in scenario 3, whose LP-FT fine-tune runs at the head's input size.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@device_options
@cache_dir_option
@json_option
@handle_errors
def demo(per_class, epochs, image_size, seed, device, precision, cache_dir, as_json):
    """Run the whole job offline on a small real dataset (scikit-learn's digits).

    advise -> extract -> every head -> a short fine-tune -> compare; prints where the report
    and the plots are.
    """
    from ..demo import run_demo, summary_text

    r = run_demo(cache_dir=resolve_cache_dir(cache_dir), per_class=per_class, epochs=epochs,
                 image_size=image_size, seed=seed, device=device, precision=precision, log=log)
    emit(r, as_json, summary_text)


@click.command()
@click.argument("runs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--dataset", default=None,
              help="Only runs of this dataset (its name, or a prefix of its fingerprint).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Bar chart PNG [default: <cache-dir>/comparison-<dataset>.png].")
@click.option("--pair", "pairs", nargs=2, multiple=True, metavar="A B",
              help="Also test run A against run B (folder path or name) with the exact McNemar "
                   "test on the images both scored; repeatable.")
@cache_dir_option
@json_option
@handle_errors
def compare(runs, dataset, output, pairs, cache_dir, as_json):
    """Heads and fine-tunes side by side: accuracy and macro-F1 with 95% intervals, trained
    parameters, training time (feature extraction counted once for heads) and inference speed.

    Runs scored on different images (another dataset fingerprint or split) go in separate
    tables. The best head and the best fine-tune of a table are compared with an exact McNemar
    test on the images both scored.

    RUNS are run folders; default: every run under <cache-dir>/runs.
    """
    from ..report.comparison import compare as run_compare
    from ..report.comparison import format_table

    res = run_compare(cache_dir=resolve_cache_dir(cache_dir), runs=runs, dataset=dataset,
                      output=output, pairs=pairs)
    for note in res.notes:
        log(f"fxtl: {note}")
    emit(res.to_dict(), as_json,
         lambda d: f"{format_table(d['rows'], paired=d['paired'])}\nchart: {d['chart']}")


@click.command("export-model")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The .onnx file to write [default: RUN/model.onnx]; a sidecar OUTPUT.json "
                   "holds the same metadata.")
@click.option("--input-dtype", type=click.Choice(["uint8", "float32"]), default="uint8",
              show_default=True, help="Type of the image input (float32 holds 0..255 values).")
@click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True,
              help="ONNX opset of the default domain.")
@cache_dir_option
@json_option
@handle_errors
def export_model(run, output, input_dtype, opset, cache_dir, as_json):
    """Write a head run (backbone + head in one graph) or a fine-tuned RUN as one ONNX file.

    The graph takes RGB images already resized and centre-cropped to the model's input size
    (uint8 NCHW, any batch size), normalises them itself and returns probabilities per class;
    the resize recipe and class names are in its metadata. Run it with
    `fxtl predict model.onnx IMAGES...` or with onnxruntime alone (docs/onnx.md).
    Needs the onnx extra: pip install 'fxtl[onnx]'.
    """
    from ..deploy.onnx_graph import export_model as run_export

    res = run_export(run, output=output, input_dtype=input_dtype, opset=opset,
                     cache_dir=resolve_cache_dir(cache_dir))
    emit(res.to_dict(), as_json,
         lambda d: (f"{d['output']}  ({d['kind']} {d['model']}, {len(d['class_names'])} classes, "
                    f"input {d['input']['dtype']} {d['input']['shape']}, opset {d['opset']}, "
                    f"max diff vs fxtl {d['max_abs_diff']:.1e})\nsidecar: {d['sidecar']}"))
