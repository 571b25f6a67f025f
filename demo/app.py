"""Start the browser demo with one command: `python demo/app.py [--base MODEL] [--adapters DIR]`.

The same as `finetune demo` (see `finetune/demo/page.py`); kept as a script so the demo can be started
from a checkout without remembering the subcommand. Options: `python demo/app.py --help`.
"""

import sys

from finetune.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
