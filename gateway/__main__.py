"""`python -m gateway …` is the `gateway` command (gateway serve starts its report workers so)."""
from .cli import main

main()
