"""`python -m tokenscope ...` (what `torchrun -m tokenscope` starts on every rank)."""

from tokenscope.entry import main

main()
