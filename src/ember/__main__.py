"""``python -m ember`` runs the command line."""

import os
import sys

from ember.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker leaves without Python's interpreter shutdown: gloo's C++ threads,
    # torn down there after destroy_process_group, sometimes abort the process ("terminate
    # called without an active exception", SIGABRT), and torchrun then reports a finished
    # job as failed. Everything ember writes is flushed and renamed into place by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
