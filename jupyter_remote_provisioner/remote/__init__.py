"""The remote agent: the program the provisioner runs on the remote host's python3.

The local side sends these modules as one bundle (see ``agent.agent_source``) over one SSH exec
channel; the bundle installs an importer for them and calls :func:`run`. Stdlib-only, ASCII,
Python >= 3.6: it runs on whatever python3 the remote host has. Nothing here is imported
locally except by tests.

The exec'd copy is a RELAY (relay.py): it connects to, or first starts, the per-user,
per-interpreter DAEMON (daemon.py) on a 0600 Unix socket in <tmp>/jupyter-remote-<uid>-agent/
and copies bytes between the channel and the socket, so kernels can outlive the SSH channel.
The daemon owns the kernels (its children), serves many clients, and gives each kernel an
owner: the client that launched or last attached to it. When the owner goes, the kernel is
orphaned and stopped once its orphan_timeout has passed (0: at once; null: never). The daemon
exits when it has neither kernels nor clients. The protocol is JSON lines: requests
{"id", "op", ...}, replies {"re", "ok", ...}, events {"event", ...}.
"""


def run(bundle, mode):
    """Entry point by ``mode``: "daemon", "jobdaemon" and "jobrelay" (a Slurm job's daemon
    and a relay to it: job.py), "sync" (the file-transfer helper, sync.py), else the relay
    (which may start a daemon, feeding it ``bundle``: the bytes this program arrived as)."""
    if mode in ("daemon", "jobdaemon"):
        from .daemon import daemon_main

        daemon_main(job=mode == "jobdaemon")
    elif mode == "sync":
        from .sync import sync_main

        sync_main()
    else:
        from .relay import relay_main

        relay_main(bundle, in_job=mode == "jobrelay")
