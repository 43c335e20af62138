"""`python -m layerskip.training --config recipe.yaml [key=value ...]`: the trainer as a module, for torchrun."""

import sys

from layerskip.cli import ArgumentParser
from layerskip.errors import LayerSkipError
from layerskip.training.command import add_train_arguments


def main() -> int:
    parser = ArgumentParser(prog="python -m layerskip.training", description="LayerSkip training (docs/TRAINING.md)")
    add_train_arguments(parser)
    try:
        args = parser.parse_args()
        return args.run(args)
    except LayerSkipError as error:
        print(f"layerskip: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
