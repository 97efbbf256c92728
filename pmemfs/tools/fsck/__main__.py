"""`python -m pmemfs.tools.fsck`: the pmemfs-fsck command (tools/bench.py falls back to it)."""

from . import main

main()
