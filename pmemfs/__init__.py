"""pmemfs: a FUSE filesystem over one memory region, built to survive its daemon.

The subpackages are the layers, each importing only from those before it
(docs/DESIGN.md, "Layers"; tests/test_layers.py keeps it so):

- media: the region and what lies in it (format, journal, allocator, checks, mkfs);
- fs: the filesystem over it (the engine, packing, placement, kernel objects, ACLs);
- serve: serving a mount (FUSE adapter, daemon, supervisor, control channel);
- the client APIs, direct.py and kernel.py, here at the top;
- tools: the commands a person runs (pmemfs, pmemfs-mkfs, pmemfs-fsck) and their parts.
"""
