"""Serving a mount: the FUSE adapter, the daemon, the supervisor and live update,
the control channel (virtual xattrs), systemd, and mounting from the outside."""
