"""`python -m hpc.standin`: run the stand-in model server (`run-batch ...`: a batch file)."""

import sys

if sys.argv[1:2] == ["run-batch"]:
    from hpc.standin.batch import run

    sys.exit(run(sys.argv[2:]))
from hpc.standin.server import main

main()
