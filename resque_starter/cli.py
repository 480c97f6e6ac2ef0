"""Command line: `resque-starter [run|demo] [--flags]` and `resque-starter ctl COMMAND`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from resque_starter import config, control, loader, logs, procmem
from resque_starter.config import EXIT_CONFIG, EXIT_INTERRUPTED, ConfigError

log = logging.getLogger("resque_starter.config")

SUBCOMMANDS = ("run", "demo", "ctl")
DEMO_APP = "resque_starter.demo.tasks"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*SUBCOMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "run")
    args = build_parser().parse_args(args_list)
    if args.command == "ctl":
        return ctl(args)
    return run(args, demo=args.command == "demo")


def build_parser() -> argparse.ArgumentParser:
    from resque_starter import __version__

    parser = argparse.ArgumentParser(
        prog="resque-starter",
        description="Preload an app once and fork N rq workers over it; a PID-1 supervisor for containers.",
    )
    parser.add_argument("--version", action="version", version=f"resque-starter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "start the supervisor (the default)"),
        ("demo", "start the supervisor on the example app, with a producer enqueuing jobs"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        config.add_flags(p)
    p = sub.add_parser("ctl", help="talk to a running supervisor through its control socket")
    p.add_argument("--run-dir", default=None, help="the supervisor's RESQUE_STARTER_RUN_DIR")
    ctl_sub = p.add_subparsers(dest="ctl_command", required=True)
    s = ctl_sub.add_parser("status", help="slots, pids, generation, state, current job, memory")
    s.add_argument("--json", action="store_true", help="the stable JSON document")
    s = ctl_sub.add_parser("mem", help="RSS, PSS, USS and shared memory of every process; the saving")
    s.add_argument("--json", action="store_true", help="the JSON document")
    s = ctl_sub.add_parser("scale", help="set the worker count: N, +N or -N (of GROUP, default the first)")
    s.add_argument("target", nargs="+", metavar="[GROUP] N")
    group = "GROUP: one worker group, named as in ctl status (default: every group)"
    for name, text in (
        ("pause", "workers take no new job (USR2)"),
        ("resume", "workers take jobs again (CONT)"),
        ("drain", "for a preStop hook: pause, then wait until no job runs"),
    ):
        s = ctl_sub.add_parser(name, help=text, description=f"{text}. {group}")
        s.add_argument("group", nargs="?", metavar="GROUP")
    s.add_argument("--timeout", type=float, default=25.0, help="seconds to wait (exit 1 after)")
    ctl_sub.add_parser("reload", help="graceful reload: a new generation (HUP)")
    ctl_sub.add_parser("kill-jobs", help="kill every running job; workers go on (USR1)")
    s = ctl_sub.add_parser("kill", help="kill one running job, as kill-jobs does; its worker goes on")
    s.add_argument("job", metavar="JOB_ID")
    s = ctl_sub.add_parser("stop", help="graceful stop (QUIT), or --quick (INT)")
    s.add_argument("--quick", action="store_true")
    text = "exit status for exec probes: --live (the default), --ready or --progress"
    s = ctl_sub.add_parser("health", help=text, description=text)
    check = s.add_mutually_exclusive_group()
    live = "the loop answers and a mold serves (the default)"
    check.add_argument("--live", action="store_const", const="live", dest="check", help=live)
    ready = "also not stopping, a worker registered, Redis answering"
    check.add_argument("--ready", action="store_const", const="ready", dest="check", help=ready)
    progress = "also jobs are taken: none waits past RESQUE_STARTER_PROGRESS_TIMEOUT untaken (liveness)"
    check.add_argument("--progress", action="store_const", const="progress", dest="check", help=progress)
    s.set_defaults(check="live")
    return parser


def run(args: argparse.Namespace, demo: bool) -> int:
    from resque_starter.supervisor import Supervisor

    flags = {k: v for k, v in vars(args).items() if k != "command"}
    environ = dict(os.environ)
    if demo and not flags.get("app") and "RESQUE_STARTER_APP" not in environ:
        flags["app"] = DEMO_APP
    try:
        settings = loader.load(flags, environ)
    except ConfigError as exc:
        print(f"resque-starter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # Ctrl-C while the config file runs (its child is killed on the way out)
        print("resque-starter: interrupted while reading the configuration", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        logs.setup(settings.log_level, settings.log_format, settings.log_config)
    except ConfigError as exc:
        print(f"resque-starter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for line in loader.warnings(environ, settings):
        log.warning("%s", line)
    if demo:
        from resque_starter.demo import producer

        producer.start_in_background(settings)
    return Supervisor(settings, flags, environ).run()


def _default_run_dir() -> str:
    """The supervisor's default run dir, found as it chose it: the first candidate holding a control
    socket, else the one it would take."""
    candidates = config.run_dir_candidates()
    return next((d for d in candidates if os.path.exists(control.socket_path(d))), candidates[0])


def ctl(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or os.environ.get("RESQUE_STARTER_RUN_DIR") or _default_run_dir()
    command = args.ctl_command
    try:
        if command == "status":
            status = control.command(run_dir, {"cmd": "status"})["status"]
            print(json.dumps(status, indent=2) if args.json else control.format_status(status))
            return 0
        if command == "mem":
            mem = control.command(run_dir, {"cmd": "mem"})["mem"]
            print(json.dumps(mem, indent=2) if args.json else procmem.format_report(mem))
            return 0
        if command == "drain":
            return 0 if control.drain(run_dir, args.timeout, print, args.group) else 1
        if command == "health":
            reply = control.request(run_dir, {"cmd": "health", "check": args.check}, timeout=2.0)
            print(json.dumps({k: v for k, v in reply.items() if k != "ok"}))
            return 0 if reply.get("ok") else 1
        message = _message(args)
        reply = control.reload(run_dir) if command == "reload" else control.command(run_dir, message)
        print(control.describe(message, reply))
        return 0
    except control.Refused as exc:
        print(f"resque-starter ctl {command}: {exc}", file=sys.stderr)
        return 1
    except control.ControlError as exc:
        print(f"resque-starter ctl: {exc}", file=sys.stderr)
        return 1


def _message(args: argparse.Namespace) -> dict[str, object]:
    """The request of a ctl command that changes the supervisor's desired state."""
    message: dict[str, object] = {"cmd": args.ctl_command}
    if args.ctl_command == "scale":
        *group, n = args.target
        message.update(n=n, group=group[0] if group else None)
    elif args.ctl_command in ("pause", "resume"):
        message["group"] = args.group
    elif args.ctl_command == "stop":
        message["quick"] = args.quick
    elif args.ctl_command == "kill":
        message["job"] = args.job
    return message
