"""`python -m finetune` (and the installed `finetune` command): the CLI, with a stop while it is imported said as
any other stop.

Importing finetune.cli.main takes 0.1 to 0.4 s on a busy host (argparse, every command's options), before `main` sets up
its stop line: a Ctrl-C then printed a traceback of importlib's frames, and a SIGTERM ended the process unsaid. Only
this module's own few imports (signal, sys, finetune.stop_signals and finetune.distributed.process_env, which load nothing else)
come before the handlers below; Python's own start-up before this module runs (the interpreter, `site`, the
`finetune` package) cannot be covered by anything of ours: a Ctrl-C there is still Python's traceback.
"""

import signal
import sys

from finetune.distributed.process_env import main_process
from finetune.stop_signals import exit_status, raise_terminated, signal_of, stop_line


def run() -> int:
    # Raised at once, even inside the import: only ours and the standard library's modules are imported here, and the
    # process ends on it (main() then holds a stop until an import ends: finetune.stop_signals.stop_outside_imports).
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        from finetune.cli.main import main
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as Terminated: nothing has run yet
        if main_process():  # every process of a launch got it: one line for the run, as main() says it
            print(stop_line(stop), file=sys.stderr)
        return exit_status(signal_of(stop))
    return main()


if __name__ == "__main__":
    sys.exit(run())
