"""`python -m hpc.standin`: run the stand-in model server."""

from hpc.standin.server import main

main()
