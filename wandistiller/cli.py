"""The `wandistiller` command: build the tiny teacher, run the demo, run notebooks, distil, generate images."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _make_tiny_teacher(args) -> int:
    from .toy import make_tiny_wan

    path = make_tiny_wan(args.path, args.variant, args.seed, overwrite=args.overwrite)
    print(f"tiny Wan {args.variant} teacher written to {path}")
    return 0


def _make_toy_world(args) -> int:
    from .toy_world import make_toy_world, recipe_from_file

    recipe = recipe_from_file(args.recipe, seed=args.seed)
    path = make_toy_world(args.path, recipe, work_dir=args.work_dir, overwrite=args.overwrite, threads=args.threads)
    print(f"toy-world teacher written to {path}")
    return 0


PATH_PARAMETER_SUFFIXES = ("_path", "_dir", "student_config")


def parse_parameter_value(text: str):
    """A -p value as papermill's CLI reads it: a Python literal (int, float, bool, None, list) or a string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _absolute_paths(parameters: dict) -> dict:
    """The notebook runs in its own folder: relative paths given on the command line mean the caller's folder."""
    out = {}
    for name, value in parameters.items():
        is_path = isinstance(value, str) and name.endswith(PATH_PARAMETER_SUFFIXES) and not Path(value).is_absolute()
        if is_path and (name.endswith("_dir") or Path(value).exists()):
            value = str(Path(value).resolve())
        out[name] = value
    return out


def rank_output_path(output: Path) -> Path:
    """Under torchrun every rank writes its own executed notebook (one shared path would lose all but one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return output
    return output.with_name(f"{output.stem}.rank{os.environ.get('RANK', '0')}{output.suffix}")


def run_notebook(notebook: str | Path, parameters: dict | None = None, output: str | Path | None = None) -> Path:
    """Execute a notebook headless with papermill in this environment's kernel; returns the executed copy.

    Unknown parameter names are an error (papermill itself only warns). Under torchrun each rank writes
    `NAME.rankN.ipynb` and only rank 0 streams cell output to the terminal.
    """
    import papermill

    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {notebook} does not exist: see notebooks/ for 01_...04_")
    parameters = _absolute_paths(parameters or {})
    try:
        known = papermill.inspect_notebook(str(notebook))
    except ValueError as err:  # nbformat's NotJSONError and NBFormatError
        raise ValueError(f"{notebook} is not a notebook ({str(err).splitlines()[0][:80]}): pass an .ipynb file such as "
                         "notebooks/03_distill.ipynb") from None
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {notebook.name}: it takes {', '.join(known)}")
    output = rank_output_path(Path(output) if output else Path("outputs") / "notebooks" / notebook.name)
    if output.resolve() == notebook.resolve():
        raise ValueError(f"--output {output} is the notebook itself: choose another path so the source is kept")
    output.parent.mkdir(parents=True, exist_ok=True)
    is_main = os.environ.get("RANK", "0") == "0"
    papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="python3",
                               cwd=str(notebook.resolve().parent), log_output=is_main, progress_bar=is_main)
    return output


def _run(args) -> int:
    parameters = {name: parse_parameter_value(value) for name, value in args.parameters}
    output = run_notebook(args.notebook, parameters, args.output)
    if os.environ.get("RANK", "0") == "0":
        print(f"executed notebook written to {output}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.output_dir), teacher_path=args.teacher_path)
    return 0


def _distill(args) -> int:
    from .loops import distill

    params = {k: v for k, v in vars(args).items() if k not in ("command", "func") and v is not None}
    result = distill(**params)
    if result.student_path is not None:
        print(f"student saved to {result.student_path} ({result.steps} steps; metrics in {result.metrics_path}); "
              f"pipeline for `wandistiller generate` in {result.output_dir / 'pipeline'}")
    return 0


def _record_targets(args) -> int:
    import json

    from .loops import record_targets

    params = {k: v for k, v in vars(args).items() if k not in ("command", "func") and v is not None}
    manifest = record_targets(**params)
    if os.environ.get("RANK", "0") == "0":
        count = sum(shard["count"] for shard in json.loads(manifest.read_text())["shards"])
        print(f"target cache complete in {manifest.parent} ({count} targets); train from it with `wandistiller "
              f"distill --cache_dir {manifest.parent}` and the same target flags")
    return 0


def _image_output_path(output: str, overwrite: bool) -> Path:
    """`output` checked before any weights load: a format PIL writes, and no silent overwrite."""
    from PIL import Image

    path = Path(output)
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--output {path} has no image extension PIL can write: use e.g. .png or .jpg")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass --overwrite to replace it, or choose another --output")
    return path


def generate_images(model: str | Path, prompts: list[str], *, seed: int = 0, device: str | None = None, **call):
    """One image per prompt from a saved Wan-Lite pipeline. Every prompt's noise comes from its own CPU generator
    seeded with `seed`, so an image depends only on its prompt, the seed and the settings (not on the device or
    on the other prompts)."""
    import torch

    from .evaluate import load_student_pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_student_pipeline(model, device=device)
    generators = [torch.Generator().manual_seed(seed) for _ in prompts]
    call = {name: value for name, value in call.items() if value is not None}
    return pipe(prompts, generator=generators, **call).images


def _generate(args) -> int:
    import math

    from .viz import image_grid

    output = _image_output_path(args.output, args.overwrite)
    images = generate_images(args.model, args.prompt, seed=args.seed, device=args.device,
                             num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                             height=args.height, width=args.width)
    image = images[0] if len(images) == 1 else image_grid(images, nrow=math.ceil(math.sqrt(len(images))))
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    print(f"{len(images)} image(s) written to {output}")
    return 0


def _add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig field, named as in the notebooks and the original tool (--num_epochs ...), with
    the field's description from DistillConfig's docstring as its help."""
    import dataclasses

    from .loops import DistillConfig

    docs = DistillConfig.docs()
    for f in dataclasses.fields(DistillConfig):
        if f.name == "callbacks":
            continue
        kind = str(f.type)
        flag = f"--{f.name}"
        doc = docs[f.name].rstrip(".")
        text = f"{doc} (default: {f.default})"
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind.startswith("list"):
            parser.add_argument(flag, nargs="+", default=None, help=f"{doc} (one or more values)")
        else:
            convert = float if kind.startswith("float") else int if kind.startswith("int") else str
            parser.add_argument(flag, type=convert, default=None, metavar=f.name.upper(), help=text)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: the usage of `distill` alone lists dozens of flags."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wandistiller",
        description="Distil the Wan 2.2 text-to-video model into Wan-Lite, a small 2D text-to-image model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_teacher_commands(sub)
    _add_run_commands(sub)
    _add_generate_command(sub)
    _add_plan_command(sub)
    return parser


def _add_teacher_commands(sub) -> None:
    """make-tiny-teacher and make-toy-world: build a teacher here, offline."""
    from .toy import VARIANTS

    p = sub.add_parser("make-tiny-teacher", help="write the embedded tiny Wan teacher as a diffusers pipeline directory",
                       description="Write a tiny, structurally faithful Wan 2.x diffusers pipeline directory, built offline.")
    p.add_argument("path", help="directory to create (must not exist or be empty)")
    p.add_argument("--variant", choices=VARIANTS, default="a14b",
                   help="a14b: two experts switched by timestep; ti2v-5b: 48-channel latents; 2.1: one transformer")
    p.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(func=_make_tiny_teacher)

    p = sub.add_parser("make-toy-world", help="train the toy-world teacher (a Wan 2.2 pipeline that draws shapes)",
                       description="Train a two-expert Wan 2.2 pipeline on the synthetic shapes world (about 100 "
                                   "minutes on 2 CPU cores). Resumable: run the same command again after an interruption.")
    p.add_argument("path", help="pipeline directory to create (must not exist or be empty)")
    p.add_argument("--work-dir", help="checkpoints of the stages (default: PATH.work)")
    p.add_argument("--seed", type=int, help="data, initialisation and noise follow the seed (default: the recipe's, 0)")
    p.add_argument("--recipe", help="JSON file of ToyWorldRecipe fields to change (e.g. a work dir's recipe.json)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pipeline directory")
    p.set_defaults(func=_make_toy_world)


def _add_run_commands(sub) -> None:
    """demo, run (a notebook), distill and record-targets."""
    p = sub.add_parser("demo", help="run the kit end to end on the toy-world teacher")
    p.add_argument("--output-dir", default="outputs/demo", help="where results go (default: outputs/demo)")
    p.add_argument("--teacher-path", default="toy", help="teacher directory or hub id (default: the toy-world teacher)")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "run", help="execute a notebook headless (papermill), also once per rank under torchrun",
        description="Execute a notebook headless with papermill in this environment's kernel.",
        epilog="Multi-GPU: torchrun --nproc_per_node=4 -m wandistiller run notebooks/03_distill.ipynb "
               "-p distributed True  (torchrun takes `-m wandistiller`, not `python -m ...`; with the console "
               "script use `torchrun --no-python ... wandistiller run ...`).")
    p.add_argument("notebook", help="the notebook to execute, e.g. notebooks/03_distill.ipynb")
    p.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", default=[],
                   metavar=("NAME", "VALUE"), help="set a parameter of the notebook's `parameters` cell (repeatable)")
    p.add_argument("--output", help="executed notebook path (default outputs/notebooks/NAME; .rankN added per rank)")
    p.set_defaults(func=_run)

    p = sub.add_parser("distill", help="distil a teacher into a Wan-Lite student (works under torchrun)",
                       description="Distil a Wan teacher into a Wan-Lite student. Under `torchrun --nproc_per_node=N "
                                   "-m wandistiller distill ... --distributed` every rank runs this command.")
    _add_distill_arguments(p)
    p.set_defaults(func=_distill)

    p = sub.add_parser("record-targets", help="record the teacher targets alone, for a later distill (works under "
                                              "torchrun)",
                       description="Run the teacher side of `distill` alone: record the teacher targets into "
                                   "--cache_dir (default OUTPUT_DIR/cache) and stop. It takes distill's flags; those "
                                   "of the targets must be the same for the later `distill --cache_dir ...`, which "
                                   "then trains without loading the teacher. Under `torchrun` (any number of nodes) "
                                   "every rank records its share of the shards; run it again to resume.")
    _add_distill_arguments(p)
    p.set_defaults(func=_record_targets)


def _add_generate_command(sub) -> None:
    p = sub.add_parser("generate", help="generate images with a saved Wan-Lite pipeline (output_dir/pipeline)",
                       description="Generate images from text with a Wan-Lite pipeline folder, offline. Several "
                                   "prompts give one grid image, in prompt order.")
    p.add_argument("--model", required=True, help="the pipeline folder, or a distillation run's output_dir")
    p.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for several: a grid)")
    p.add_argument("--output", required=True, help="image file to write, e.g. out.png")
    p.add_argument("--num_inference_steps", type=int, help="sampling steps (default: the pipeline's, 8)")
    p.add_argument("--guidance_scale", type=float,
                   help="CFG scale (default: 1.0 for a CFG-distilled student, one forward per step; else the "
                        "teacher's)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same image (default: 0)")
    p.add_argument("--height", type=int, help="pixels (default: the student's image size)")
    p.add_argument("--width", type=int, help="pixels (default: the student's image size)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_generate)


def _add_plan_command(sub) -> None:
    from .plan import H200_TFLOPS

    p = sub.add_parser("plan", help="what recording a teacher's targets will cost, before any weight is loaded",
                       description="Teacher forwards, TFLOP, target-cache bytes and GPU-hours of recording trajectory "
                                   "targets, read from the teacher's config files (meta device, no weights).")
    p.add_argument("--teacher_path", default="tiny", help="teacher directory or hub id (default: tiny)")
    p.add_argument("--data_path", help="prompts file: .txt, .csv, .tsv, .json, .jsonl or .parquet (default: the packaged "
                                       "prompts)")
    p.add_argument("--prompt_column", help="the column of a table data_path that holds the prompts (default: prompt)")
    p.add_argument("--height", type=int, default=512, help="pixels (default: 512)")
    p.add_argument("--width", type=int, default=512, help="pixels (default: 512)")
    p.add_argument("--num_inference_steps", type=int, default=40, help="teacher sampler steps (default: 40)")
    p.add_argument("--trajectories_per_prompt", type=int, default=1, help="trajectories per prompt (default: 1)")
    p.add_argument("--steps_per_trajectory", type=int, help="steps of each trajectory the cache keeps (default: all)")
    p.add_argument("--cache_dtype", default="bfloat16", help="dtype of the cached targets (default: bfloat16)")
    p.add_argument("--teacher_dtype", default="float32", help="the teacher's dtype, that of the cached prompt "
                                                              "embeddings (default: float32)")
    p.add_argument("--guidance_scale", type=float, help="CFG scale (default: the teacher's, as WanPipeline)")
    p.add_argument("--guidance_scale_2", type=float, help="the low-noise expert's CFG scale (A14B)")
    p.add_argument("--tflops", type=float, default=H200_TFLOPS,
                   help=f"sustained TFLOP/s of one GPU (default: {H200_TFLOPS:g}, an A14B expert forward measured on "
                        "an H200 in bf16)")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    from .plan import make_plan

    plan = make_plan(args.teacher_path, args.data_path, height=args.height, width=args.width,
                     num_inference_steps=args.num_inference_steps, trajectories_per_prompt=args.trajectories_per_prompt,
                     guidance_scale=args.guidance_scale, guidance_scale_2=args.guidance_scale_2, tflops=args.tflops,
                     prompt_column=args.prompt_column, cache_dtype=args.cache_dtype, teacher_dtype=args.teacher_dtype,
                     steps_per_trajectory=args.steps_per_trajectory)
    print(plan.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"wandistiller: error: {err}", file=sys.stderr)
        return 2
