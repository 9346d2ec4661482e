"""`python -m tokenscope ...` (what `torchrun -m tokenscope` starts on every rank)."""

from tokenscope.cli import app

app(prog_name="tokenscope")
