"""`python -m finetune.bench --worker SPEC RESULT`: the child process that runs and measures one variant."""

import sys

from finetune.bench.measure import _worker

if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: finetune bench ... (this module's --worker entry is internal)")
