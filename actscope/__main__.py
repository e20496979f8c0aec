"""``python -m actscope``: the command line, as the ``actscope`` script."""

from actscope.jobs.cli import main

main()
