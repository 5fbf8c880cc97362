"""`dalle-fast` command line. Each subcommand lives with the code it drives and exposes
register(subparsers), which adds its parser and sets `func` to a function taking the parsed args."""
import argparse
import importlib
import sys

SUBCOMMAND_MODULES = [
    "dalle_fast.demo",          # demo
    "dalle_fast.train.vae",     # train-vae
    "dalle_fast.train.vae_decoder",  # tune-vae-decoder
    "dalle_fast.tokenizer",     # train-tokenizer
    "dalle_fast.train.dalle",   # train-dalle
    "dalle_fast.train.clip",    # train-clip
    "dalle_fast.generate",      # generate
    "dalle_fast.eval.quality",  # eval
    "dalle_fast.train.diffusion",  # train-diffusion, train-upsampler, train-prior
    "dalle_fast.diffusion.cli",    # vary, interpolate
]


def build_parser():
    parser = argparse.ArgumentParser(prog="dalle-fast", description="DALL-E with fused C++/CUDA kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("selftest", help="check every built backend on every present device against the reference")
    selftest = importlib.import_module("dalle_fast.selftest")
    selftest.add_arguments(p)
    p.set_defaults(func=lambda args: selftest.run(args.device))
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):  # every command that takes --threads means the same by it
        import torch
        torch.set_num_threads(args.threads)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # user errors (bad paths, bad input, corrupt files) print one clear line, not a traceback
        print(f"dalle-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
