"""The commands a person runs (pmemfs, pmemfs-mkfs, pmemfs-fsck) and what only they
use: fsck's repairs, info, the region map, the crash workload."""
