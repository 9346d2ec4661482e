"""`python -m tokenscope ...` (what `torchrun -m tokenscope` starts on every rank)."""

import sys

try:
    from tokenscope.entry import main
except KeyboardInterrupt:  # Ctrl-C while the package itself loads: said, not a traceback
    sys.stderr.write("interrupted while starting; nothing was done\n")
    raise SystemExit(130) from None

main()
