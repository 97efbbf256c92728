"""The filesystem over the media: the engine (POSIX semantics, no FUSE), packing of
small files, placement, holes, kernel objects, credentials and ACLs, leases."""
