"""The `diffplat` command: run a job file, run the demo, write a tiny model."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffplat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job file (YAML): its prepare/train/generate/filter stages")
    run.add_argument("job", help="path to a job YAML, e.g. jobs/bdd_lora.yaml")
    run.add_argument("--workdir", default=".", help="folder that relative paths in the job are relative to")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.max_train_steps=100 (repeatable)")  # fmt: skip
    _verbose(run)

    check = sub.add_parser("check", help="parse a job file and print the resolved config")
    check.add_argument("job")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    demo = sub.add_parser("demo", help="the whole pipeline on a tiny model and synthetic data")
    demo.add_argument("--output", default="demo-output", help="where everything is written")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _verbose(demo)

    fill = sub.add_parser("ic-lora-infer", help="fill panels of a composite with an In-Context LoRA (source 1's flags)",
                          description="Fill the named panels of a composite image; the other panels are kept "
                                      "pixel for pixel. Flags and defaults are those of the SDXL In-Context LoRA "
                                      "inference script.")  # fmt: skip
    fill.add_argument("--lora_path", required=True, help="LoRA folder (or .safetensors file), e.g. output/final_model")
    fill.add_argument("--input_image", required=True, help="the composite whose panels to fill")
    fill.add_argument("--prompt", required=True)
    fill.add_argument("--panels_to_inpaint", type=int, nargs="+", default=[2, 3], metavar="N",
                      help="panels to fill: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right (default: 2 3)")
    fill.add_argument("--output_dir", default="inference_output")
    fill.add_argument("--negative_prompt", default=None)
    fill.add_argument("--num_inference_steps", type=int, default=50)
    fill.add_argument("--guidance_scale", type=float, default=7.5)
    fill.add_argument("--num_images", type=int, default=1)
    fill.add_argument("--seed", type=int, default=None, help="image i gets seed + i; default: a random seed")
    fill.add_argument("--use_gradient_mask", action="store_true", help="blend seams with a soft mask")
    fill.add_argument("--gradient_width", type=int, default=20, help="pixels of soft transition (default: 20)")
    fill.add_argument("--strength", type=float, default=1.0)
    fill.add_argument("--base_model", default=None,
                      help="default: the base model recorded with the LoRA, else stabilityai/stable-diffusion-xl-base-1.0")
    fill.add_argument("--save_comparison", action="store_true", help="also write input | mask | output side by side")
    fill.add_argument("--layout", default="2x2", help="ROWSxCOLS of the composite (diffplat; default 2x2)")
    fill.add_argument("--panel_heights", type=float, nargs="+", default=None, metavar="H",
                      help="rows' heights, in pixels or any proportions, e.g. 480 460 423 for film frames of "
                           "unequal height (diffplat; default: equal rows)")
    fill.add_argument("--panel_widths", type=float, nargs="+", default=None, metavar="W",
                      help="columns' widths, likewise (diffplat; default: equal columns)")
    fill.add_argument("--max_token_length", type=int, choices=[75, 150, 225], default=None,
                      help="prompt tokens kept (diffplat; default: what the LoRA was trained with, else 75)")

    srv = sub.add_parser("serve", help="run the HTTP API (Ray Serve) on this machine, on 127.0.0.1 unless configured",
                         description="Serve text-to-image, In-Context LoRA, ControlNet and detection over HTTP. "
                                     "With no CONFIG: the models `make demo` wrote, from ./demo-output.")  # fmt: skip
    srv.add_argument("config", nargs="?", default=None, help="a Ray Serve config, e.g. serve/diffplat.yaml "
                     "(default: serve/local.yaml as shipped in the package)")  # fmt: skip
    srv.add_argument("--port", type=int, default=None, help="default: the config's, else 8000")
    srv.add_argument("--workdir", default=None, help="what the config's relative paths are relative to")
    srv.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")

    export = sub.add_parser("export-lora", help="write a LoRA in another format (kohya: one file for SDXL front ends)")
    export.add_argument("adapter", help="an adapter folder (pytorch_lora_weights.safetensors) or that file")
    export.add_argument("--format", choices=["kohya"], default="kohya")
    export.add_argument("--out", required=True, help="the .safetensors file to write")

    imp = sub.add_parser("import-flags", help="turn a source 2 or source 5 training command line into a job YAML",
                         description="Map the flags of diffusers' train_text_to_image_lora_sdxl.py (source 2) or of "
                                     "plain PyTorch SDXL fine-tuning (source 5) to a diffplat job. One line a flag on "
                                     "stderr: mapped, default (the source's, where diffplat's differs), noted or "
                                     "refused with the reason.")  # fmt: skip
    imp.add_argument("--out", default=None, metavar="FILE", help="write the job here, whole (default: stdout)")
    imp.add_argument("flags", nargs=argparse.REMAINDER, metavar="-- FLAGS",
                     help="the training command line, launcher and script name optional")

    infer = sub.add_parser("infer", help="run source 2's inference YAML as it is written",
                           description="Generate with source 2's --infer_config YAML (paths, prompt, negative_prompt, "
                                       "adapter_scale, resolution, num_generations, guidance_scale): images go to "
                                       "infer_path/batch_NNN, one batch per run.")  # fmt: skip
    infer.add_argument("--infer_config", required=True, metavar="FILE")
    infer.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="a job field the YAML has no key for, e.g. generate.replicas=4")
    _verbose(infer)
    from diffplat.infer.commands import generate_parser

    generate_parser(sub)

    board = sub.add_parser("mlflow", help="the MLflow dashboard for a work folder's runs (SQLite store, on 127.0.0.1)")
    board.add_argument("--workdir", default=".", help="the work folder whose mlflow.db and mlartifacts/ it serves")
    board.add_argument("--host", default="127.0.0.1", help="address to listen on; anything else exposes every run")
    board.add_argument("--port", type=int, default=5000)

    tiny = sub.add_parser("tiny-model", help="write a tiny random SDXL or FLUX.1 pipeline in the diffusers layout")
    tiny.add_argument("out")
    tiny.add_argument("--kind", choices=["sdxl", "sdxl-inpaint", "controlnet", "flux", "flux-fill"], default="sdxl")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--fit-vae", dest="fit_vae", default=None, metavar="IMAGES",
                      help="a folder of images the VAE first learns to reconstruct (so pictures are readable)")
    tiny.add_argument("--fit-steps", dest="fit_steps", type=int, default=300)
    tiny.add_argument("--decoder-steps", dest="decoder_steps", type=int, default=0,
                      help="then steps of the decoder alone: sharper pictures from the same latents")
    tiny.add_argument("--whole-words", dest="whole_words", action="store_true",
                      help="tokenize the words of BDD captions whole, as a real CLIP does (SDXL kinds; default: bytes)")
    return parser


def _verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show the other libraries' logs, warnings and "
                        "progress bars too (ray.verbose; they are always in Ray's session logs)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from diffplat import console

    verbose = getattr(args, "verbose", False)
    console.setup(verbose)
    if verbose:
        args.overrides.append("ray.verbose=true")
    from diffplat.config import ConfigError, load_config, to_yaml
    from diffplat.data.composites import CompositeError
    from diffplat.models.lora import LoraFileError

    InputError = (CompositeError, LoraFileError)

    try:
        if args.command == "check":
            print(to_yaml(load_config(args.job, args.overrides)), end="")
        elif args.command == "run":
            from diffplat.runner import run_job

            result = run_job(load_config(args.job, args.overrides), args.workdir, args.job)
            for stage, secs in result.seconds.items():
                print(f"{stage:<9} {secs:7.1f} s")
            print(f"mlflow run {result.run_id} in {result.tracking_uri}")
        elif args.command == "demo":
            from diffplat.demo import run_demo
            from diffplat.extras import EXTRAS, require

            require(EXTRAS, "the demo")  # it runs every stage, the API and the dashboard
            run_demo(args.output, args.overrides)
        elif args.command == "ic-lora-infer":
            from diffplat.infer.panels import fill_command

            for path in fill_command(args):
                print(path)
        elif args.command == "serve":
            from diffplat.extras import require

            require(["serve"], "diffplat serve")
            from diffplat.demo import demo_config_path
            from diffplat.serving.app import serve_forever

            serve_forever(args.config or demo_config_path("serve_local.yaml"), args.port, args.workdir, args.num_cpus)
        elif args.command == "export-lora":
            from diffplat.models.kohya import export_kohya

            print(export_kohya(args.adapter, args.out))
        elif args.command == "import-flags":
            from diffplat.import_flags import import_command

            import_command(args.flags, args.out)
        elif args.command in ("infer", "generate"):
            from diffplat.cluster import cluster_gpus
            from diffplat.infer.commands import generate_job, infer_config_job
            from diffplat.runner import ray_session, run_job

            if args.command == "infer":
                job = infer_config_job(args.infer_config, args.overrides)
            else:
                job = generate_job(args, args.overrides, gpus=0)  # its ray section, to find the cluster
            with ray_session(job.ray):
                if args.command == "generate":  # "every GPU" means the cluster's, known once Ray is up
                    job = generate_job(args, args.overrides, gpus=cluster_gpus())
                result = run_job(job, ".")
            done = result.outputs["generate"]
            print(f"{done['images']} images in {done['folder']}")
        elif args.command == "mlflow":
            from diffplat.extras import require

            require(["tracking-server"], "diffplat mlflow")
            from diffplat.dashboard import serve_dashboard

            return serve_dashboard(args.workdir, args.host, args.port)
        elif args.command == "tiny-model":
            from diffplat.models.tiny import write_tiny_model

            images = None
            if args.decoder_steps and not args.fit_vae:
                raise ConfigError("--decoder-steps: the decoder learns the images the VAE is fitted to; give --fit-vae")
            if args.fit_steps < 0 or args.decoder_steps < 0:
                raise ConfigError("--fit-steps and --decoder-steps count steps: 0 or more")
            if args.fit_vae:
                from diffplat.data.images import readable_images

                images, bad = readable_images(args.fit_vae)
                if not images:
                    raise ConfigError(f"--fit-vae {args.fit_vae}: no readable image there ({bad} could not be read)")
            print(write_tiny_model(args.out, args.kind, args.seed, images, args.fit_steps, args.whole_words,
                                   args.decoder_steps))  # fmt: skip
    except ConfigError as err:
        print(f"diffplat: {err}", file=sys.stderr)
        return 2
    except InputError as err:  # a bad image, panel, path or adapter the user named: one line, no traceback
        print(f"diffplat: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
