#!/usr/bin/env python
"""The quality report of a text-to-image model on Shapes prompts: same as `dalle-fast eval` (see its --help)."""
import sys

from dalle_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
