"""The `diffplat` command: run a job file, run the demo, write a tiny model."""

from __future__ import annotations

import argparse
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffplat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job file (YAML): its prepare/train/generate/filter stages")
    run.add_argument("job", help="path to a job YAML, e.g. jobs/bdd_lora.yaml")
    run.add_argument("--workdir", default=".", help="folder that relative paths in the job are relative to")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.max_train_steps=100 (repeatable)")  # fmt: skip

    check = sub.add_parser("check", help="parse a job file and print the resolved config")
    check.add_argument("job")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    demo = sub.add_parser("demo", help="the whole pipeline on a tiny model and synthetic data")
    demo.add_argument("--output", default="demo-output", help="where everything is written")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    tiny = sub.add_parser("tiny-model", help="write a tiny random SDXL pipeline in the diffusers layout")
    tiny.add_argument("out")
    tiny.add_argument("--kind", choices=["sdxl", "sdxl-inpaint", "controlnet"], default="sdxl")
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[diffplat] %(message)s", stream=sys.stderr)
    from diffplat.config import ConfigError, load_config, to_yaml

    try:
        if args.command == "check":
            print(to_yaml(load_config(args.job, args.overrides)), end="")
        elif args.command == "run":
            from diffplat.runner import run_job

            result = run_job(load_config(args.job, args.overrides), args.workdir)
            for stage, secs in result.seconds.items():
                print(f"{stage:<9} {secs:7.1f} s")
            print(f"mlflow run {result.run_id} in {result.tracking_uri}")
        elif args.command == "demo":
            from diffplat.demo import run_demo

            run_demo(args.output, args.overrides)
        elif args.command == "tiny-model":
            from diffplat.models.tiny import write_tiny_model

            print(write_tiny_model(args.out, args.kind, args.seed))
    except ConfigError as err:
        print(f"diffplat: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
