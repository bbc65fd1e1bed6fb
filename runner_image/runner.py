"""warmpool sandbox runner: the entry point of PID 1 in every sandbox container (stdlib only; see PROTOCOL.md).

The runner is the package `runner_image.sandbox` (one module per job; its __init__ says which process runs
which). The image holds it at /opt/warmpool/runner_image/sandbox/ and runs this file as
`python3 -I /opt/warmpool/runner.py`. Isolated mode leaves this file's dir out of sys.path: it goes in just
long enough to import the package (every module of it, before the template is forked), then out again, so
that a task's imports never find the runner's files.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from runner_image.sandbox import pid1

    del sys.path[0]
    pid1.main()
