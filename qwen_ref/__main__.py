"""`python -m qwen_ref` is the `qwen-ref` command."""

import sys

from qwen_ref.cli import main

sys.exit(main())
