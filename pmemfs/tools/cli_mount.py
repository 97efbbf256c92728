"""The commands of a mount's life: `pmemfs mount` (and -o remount), `umount`, `upgrade`,
and `systemd-unit`, which makes a unit that mounts at boot."""

from __future__ import annotations

import os

import click

from ..media.region import RegionError
from .cli_types import Size


@click.command("mount")
@click.option("-f", "--foreground", is_flag=True,
              help="Stay in the foreground (the supervisor, or with --single the one daemon).")
@click.option("--single", is_flag=True,
              help="One process that mounts and serves, without a supervisor "
                   "(a daemon that dies leaves the mount dead; a restart is a remount).")
@click.option("-o", "options", multiple=True,
              help="Mount options (README, \"Mount options\"): ro, noatime, strictatime, nodiratime, "
                   "dev, suid, noexec, allow_other, sync, prefault, force, live=off; remount.")
@click.option("--force", is_flag=True, help="Clear a dead FUSE mount at MOUNTPOINT first.")
@click.option("--log", type=click.Path(dir_okay=False), help="Write the daemon's log here.")
@click.option("--debug", is_flag=True, help="Log every request.")
@click.option("--respawn", is_flag=True, hidden=True,
              help="The default now: a supervisor replaces a daemon that dies.")
@click.argument("region")
@click.argument("mountpoint", required=False)
def mount_command(foreground, single, options, force, log, debug, respawn, region, mountpoint):
    """Mount REGION on MOUNTPOINT (returns once the mount answers).

    With -o remount: change the options of the mount at MOUNTPOINT (REGION may be left
    out), as mount(8) -o remount does."""
    from ..serve.mounting import OptionError, check_privilege, remount, resolve_options, spawn

    words = [o.strip() for group in options for o in group.split(",") if o.strip()]
    if "remount" in words:
        target = mountpoint or region
        try:
            flags = remount(target, words)
        except OptionError as e:
            raise click.UsageError(str(e)) from None
        click.echo(f"remounted {target} ({flags})")
        return 0
    if mountpoint is None:
        raise click.UsageError("Missing argument 'MOUNTPOINT'.")
    try:
        opts = resolve_options(words)
        check_privilege(opts)
    except OptionError as e:
        raise click.UsageError(str(e)) from None
    if force:
        opts.add("force")
    if not os.path.exists(region):
        raise RegionError(f"{region}: no such region (make one with pmemfs-mkfs)")
    if foreground:
        # Only the single daemon needs the heavy imports (numpy, pyfuse3, trio): the
        # supervisor's start is part of the gap of a `systemctl restart`.
        from ..serve.mounting import make_mountpoint, prepare_mountpoint
        from ..serve.process import setup_logging
        from ..serve.systemd import inherited_fds, notify, under_systemd

        setup_logging(log, debug)
        inherited = {} if single else inherited_fds()
        if not inherited:  # else the mount is there, unserved: a stat would wait for us
            if under_systemd():
                make_mountpoint(mountpoint)  # the unit's job: MOUNTPOINT= may not exist yet
            prepare_mountpoint(region, mountpoint, "force" in opts)

        def ready(msg: str) -> None:
            click.echo(f"mounted {region} on {mountpoint} ({msg})", err=True)
            if msg.startswith("ok"):
                notify(f"READY=1\nSTATUS=serving {region} on {mountpoint}")  # Type=notify units

        if single:
            from ..serve.daemon import serve

            return serve(region, mountpoint, opts - {"force"}, ready=ready)
        from ..serve.supervisor import supervise

        return supervise(region, mountpoint, opts - {"force"}, ready, log, debug, inherited)
    m = spawn(region, mountpoint, opts, log=log, debug=debug, single=single)
    note = " (cleared a dead mount first)" if m.recovered_stale else ""
    who = "daemon" if single else "supervisor"
    click.echo(f"mounted {region} on {mountpoint}: {who} pid {m.proc.pid}, {m.status[3:]}, "
               f"{m.downtime_ms:.0f} ms{note}")
    return 0


@click.command("umount")
@click.argument("mountpoint")
def umount_command(mountpoint):
    """Unmount MOUNTPOINT and wait until the region is marked clean."""
    from ..serve.mounting import unmount

    region = unmount(mountpoint)
    click.echo(f"unmounted {mountpoint}; {region} is clean")


@click.command("upgrade")
@click.argument("mountpoint")
def upgrade_command(mountpoint):
    """Replace MOUNTPOINT's daemon by one running the code installed now, without
    unmounting: in-flight requests drain, clients see a pause."""
    from ..serve.mountctl import SupervisorError, ask

    answer = ask(mountpoint, {"verb": "upgrade"})
    if not answer.get("ok"):
        raise SupervisorError(f"{mountpoint}: {answer.get('error', 'upgrade failed')}")
    click.echo(f"upgraded {mountpoint}: daemon {answer['old_pid']} -> {answer['daemon_pid']}, "
               f"gap {answer['gap_ms']} ms")


@click.command("systemd-unit")
@click.option("--install", "do_install", is_flag=True,
              help="Write the unit to /etc/systemd/system (and the instance's conf) instead of printing.")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Install under this directory (for images and tests).")
@click.option("--instance", help="Also define instance NAME: /etc/pmemfs/NAME.conf.")
@click.option("--region", help="The instance's region.")
@click.option("--mountpoint", help="The instance's mountpoint.")
@click.option("-o", "options", default="", help="The instance's mount options (pmemfs mount -o).")
@click.option("--create-size", type=Size(), default=None,
              help="Make the region at start when it is missing (a /dev/shm region after a cold boot).")
def systemd_unit_command(do_install, root, instance, region, mountpoint, options, create_size):
    """Print or install pmemfs@.service; an instance NAME mounts /etc/pmemfs/NAME.conf's region."""
    from ..serve.mounting import OptionError, resolve_options
    from ..serve.systemd import UnitError, check_instance, conf_text, install, unit_text

    try:
        conf = None
        if instance or region or mountpoint:
            if not (instance and region and mountpoint):
                raise UnitError("--instance, --region and --mountpoint go together")
            check_instance(instance)
            try:
                resolve_options(options.split(","))
            except OptionError as e:
                raise UnitError(str(e)) from None
            conf = conf_text(os.path.abspath(region), os.path.abspath(mountpoint), options,
                             str(create_size) if create_size else "")
        if not do_install:
            click.echo(unit_text(), nl=False)
            if conf:
                click.echo(f"\n# /etc/pmemfs/{instance}.conf\n" + conf, nl=False)
            return 0
        for path in install(root, instance, conf):
            click.echo(f"wrote {path}")
    except UnitError as e:
        raise click.ClickException(str(e)) from None
    name = f"pmemfs@{instance}.service" if instance else "pmemfs@NAME.service"
    click.echo(f"next: systemctl daemon-reload && systemctl enable --now {name}")
    return 0
