#!/usr/bin/env python3
"""Run jfe-jax on a Cloud TPU VM slice: create, setup, run, logs, stop, delete.

    python launch/tpu.py create --name NAME --zone ZONE --accelerator-type v5p-64 [--spot|--queued]
    python launch/tpu.py setup  --name NAME --zone ZONE --repo URL [--ref REF] | --wheel FILE
    python launch/tpu.py run    --name NAME --zone ZONE --config FILE.py --workdir gs://B/run \
                                [--data gs://B/data] [--init-from gs://B/model] [-- --config.x=y]
    python launch/tpu.py logs   --name NAME --zone ZONE [--worker N] [--follow]
    python launch/tpu.py stop   --name NAME --zone ZONE [--force]
    python launch/tpu.py delete --name NAME --zone ZONE [--queued]

Every subcommand only prints the gcloud commands it would run unless given ``--yes``;
``--dry-run`` prints them even with ``--yes``. Standard library only: it shells out to
``gcloud`` and never touches the network itself. See launch/README.md for the workflow.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

# Where things live on every TPU VM worker (POSIX shell syntax, expanded remotely).
REMOTE_REPO = "$HOME/jfe-jax"  # git checkout (setup --repo)
REMOTE_VENV = "$HOME/jfe-venv"  # the virtual environment jfe runs from
REMOTE_RUN = "$HOME/jfe-run"  # configs, staged inputs, TFDS cache, logs, pid file
REMOTE_LOGS = f"{REMOTE_RUN}/logs"
REMOTE_PID = f"{REMOTE_RUN}/train.pid"
LATEST_LOG = f"{REMOTE_LOGS}/latest.log"  # symlink to the newest run's log


# ============================================================================ accelerators


@dataclass(frozen=True)
class Family:
    """One TPU generation: which slice sizes exist, and how many hosts a size has."""

    sizes: str  # human-readable list, for error messages
    default_runtime: str  # TPU software version for JAX (cloud.google.com/tpu/docs/runtimes)
    chips_per_host: int  # multi-host slices
    cores_per_chip: int  # the number in "v4-32" counts TensorCores for these, chips for 1


FAMILIES = {
    "v2": Family("8, 32, 128, 256, 512", "tpu-ubuntu2204-base", 4, 2),
    "v3": Family("8, 32, 64, 128, 256, 512, 1024, 2048", "tpu-ubuntu2204-base", 4, 2),
    "v4": Family("multiples of 8 from 8 to 4096", "tpu-ubuntu2204-base", 4, 2),
    "v5p": Family("multiples of 8 from 8 to 12288", "v2-alpha-tpuv5", 4, 2),
    "v5litepod": Family("1, 4, 8, 16, 32, 64, 128, 256", "v2-alpha-tpuv5-lite", 4, 1),
    "v6e": Family("1, 4, 8, 16, 32, 64, 128, 256", "v2-alpha-tpuv6e", 4, 1),
}
_EXACT_SIZES = {
    "v2": {8, 32, 128, 256, 512},
    "v3": {8, 32, 64, 128, 256, 512, 1024, 2048},
    "v5litepod": {1, 4, 8, 16, 32, 64, 128, 256},
    "v6e": {1, 4, 8, 16, 32, 64, 128, 256},
}
_MAX_SIZE = {"v4": 4096, "v5p": 12288}


@dataclass(frozen=True)
class Accelerator:
    """A slice such as ``v5p-64``: family and size as gcloud spells them."""

    family: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.size}"

    @property
    def hosts(self) -> int:
        """TPU VM workers in the slice; each runs one jfe process."""
        family = FAMILIES[self.family]
        chips = self.size // family.cores_per_chip
        if family.cores_per_chip == 1 and chips <= 8:
            return 1  # v5e / v6e up to 8 chips: one host
        return max(1, chips // family.chips_per_host)


def parse_accelerator(text: str) -> Accelerator:
    """``v5p-64`` -> Accelerator; ValueError naming the known families and sizes otherwise."""
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", text.strip())
    if not match:
        raise ValueError(
            f"unknown accelerator type {text!r}: expected FAMILY-SIZE with FAMILY one of "
            f"{', '.join(FAMILIES)} (e.g. v5p-64, v4-32, v5litepod-16, v6e-8)"
        )
    family, size = match.group(1), int(match.group(2))
    if family in _EXACT_SIZES:
        valid = size in _EXACT_SIZES[family]
    else:
        valid = size % 8 == 0 and 8 <= size <= _MAX_SIZE[family]
    if not valid:
        raise ValueError(
            f"accelerator type {text!r} has no slice of size {size}; {family} sizes are "
            f"{FAMILIES[family].sizes}"
        )
    return Accelerator(family, size)


# ============================================================================ validation

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_GCS = re.compile(r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?")
_OVERRIDE = re.compile(r"--config\.[A-Za-z_][A-Za-z0-9_.]*=.*", re.DOTALL)
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"--name {name!r} is not a valid TPU name: lowercase letters, digits and '-', "
            "starting with a letter, at most 63 characters"
        )
    return name


def check_zone(zone: str) -> str:
    if not _ZONE.fullmatch(zone):
        raise UsageError(f"--zone {zone!r} does not look like a zone (e.g. us-east5-a)")
    return zone


def is_gcs(path: str) -> bool:
    return bool(_GCS.fullmatch(path))


def check_gcs(flag: str, path: str) -> str:
    if not is_gcs(path):
        raise UsageError(f"{flag} {path!r} is not a gs://BUCKET/PATH location")
    return path.rstrip("/")


# ============================================================================ commands


TPU_VM = ("gcloud", "compute", "tpus", "tpu-vm")
QUEUED_RESOURCES = ("gcloud", "compute", "tpus", "queued-resources")


def tpu_vm(args, verb: str, *rest: str) -> list[str]:
    """``gcloud compute tpus tpu-vm VERB NAME ... --zone=Z [--project=P]``."""
    return [*TPU_VM, verb, args.name, *rest, *location(args)]


def location(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def ssh(args, script: Sequence[str], *, worker: str = "all") -> list[str]:
    """Runs a POSIX shell script (one line per entry, joined with '; ') on the workers."""
    return tpu_vm(args, "ssh", f"--worker={worker}", "--command=" + "; ".join(script))


def scp(args, source: str, destination: str) -> list[str]:
    """Copies a local file to ``destination`` (relative to the home directory) on all workers."""
    return [*TPU_VM, "scp", source, f"{args.name}:{destination}", "--worker=all", *location(args)]


def create_commands(args) -> list[list[str]]:
    """Creates the slice: a TPU VM directly, or a queued resource that waits for capacity."""
    accelerator = parse_accelerator(args.accelerator_type)
    runtime = args.runtime_version or FAMILIES[accelerator.family].default_runtime
    if args.queued:
        if args.preemptible:
            raise UsageError("--preemptible is not available for queued resources; use --spot")
        command = [
            *QUEUED_RESOURCES,
            "create",
            args.name,
            f"--node-id={args.name}",
            f"--accelerator-type={accelerator.name}",
            f"--runtime-version={runtime}",
            *location(args),
        ]
        if args.valid_until_duration:
            command.append(f"--valid-until-duration={args.valid_until_duration}")
    else:
        if args.valid_until_duration:
            raise UsageError("--valid-until-duration only applies with --queued")
        command = tpu_vm(
            args, "create", f"--accelerator-type={accelerator.name}", f"--version={runtime}"
        )
    if args.spot:
        command.append("--spot")
    if args.preemptible:
        command.append("--preemptible")
    return [command]


def setup_commands(args) -> list[list[str]]:
    """Installs jfe-jax (git checkout or wheel) into a venv on every worker."""
    if bool(args.repo) == bool(args.wheel):
        raise UsageError("setup needs exactly one of --repo URL (git clone) or --wheel FILE")
    py = args.python
    if not re.fullmatch(r"python3(\.\d+)?", py):
        raise UsageError(f"--python {py!r} must name an interpreter like python3.11")
    pip = f'"{REMOTE_VENV}/bin/pip"'
    commands = []
    script = [
        "set -eu",
        f'mkdir -p "{REMOTE_LOGS}" "{REMOTE_RUN}/config"',
        f"if ! command -v {py} >/dev/null 2>&1; then sudo apt-get update -q && "
        f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {py} {py}-venv; fi",
    ]
    extras = " ".join(shlex.quote(p) for p in args.extra_packages)
    if args.repo:
        repo, ref = shlex.quote(args.repo), shlex.quote(args.ref)
        script += [
            f'if [ ! -d "{REMOTE_REPO}/.git" ]; then git clone --quiet {repo} "{REMOTE_REPO}"; fi',
            f'git -C "{REMOTE_REPO}" fetch --quiet {repo} {ref}',
            f'git -C "{REMOTE_REPO}" checkout --quiet --detach FETCH_HEAD',
        ]
        package = f'-e "{REMOTE_REPO}[tpu]"'
    else:
        wheel = os.path.basename(args.wheel)
        if not re.fullmatch(r"[\w.+-]+\.whl", wheel):
            raise UsageError(f"--wheel {args.wheel!r} is not a .whl file")
        if not os.path.isfile(args.wheel):
            raise UsageError(f"--wheel {args.wheel!r} does not exist (build it: pip wheel .)")
        commands.append(scp(args, args.wheel, wheel))
        package = f'"$HOME/{wheel}[tpu]"'
    script += [
        f'{py} -m venv "{REMOTE_VENV}"',
        f"{pip} install --quiet --upgrade pip",
        f"{pip} install --quiet {package} {extras}".rstrip(),
    ]
    script.append(
        f'"{REMOTE_VENV}/bin/python" -c "import jax; jax.distributed.initialize(); '
        "print('jfe-jax ready: process', jax.process_index(), 'of', jax.process_count(), "
        "jax.local_device_count(), 'local devices of', jax.device_count())\""
    )
    commands.append(ssh(args, script))
    return commands


def run_commands(args, overrides: Sequence[str]) -> list[list[str]]:
    """Copies the config to every worker and starts ``jfe train`` there under nohup."""
    if not args.config.endswith(".py") or not os.path.isfile(args.config):
        raise UsageError(f"--config {args.config!r} is not an existing .py config file")
    hosts = parse_accelerator(args.accelerator_type).hosts if args.accelerator_type else None
    if hosts == 1 and not is_gcs(args.workdir):
        if not args.workdir.startswith("/"):
            raise UsageError(f"--workdir {args.workdir!r} must be gs://BUCKET/PATH or absolute")
        workdir = args.workdir  # single host: a VM-local workdir is allowed (lost on delete)
    elif not is_gcs(args.workdir):
        where = f"{args.accelerator_type} has {hosts} hosts" if hosts else "multi-host slices"
        raise UsageError(
            f"--workdir {args.workdir!r} is not a gs://BUCKET/PATH location: {where}, and every "
            "host must write checkpoints to the same place (pass --accelerator-type of a "
            "single-host slice to use a local directory)"
        )
    else:
        workdir = args.workdir.rstrip("/")
    for item in overrides:
        if not _OVERRIDE.fullmatch(item):
            raise UsageError(
                f"unrecognized argument {item!r}: only --config.KEY=VALUE overrides are passed "
                "on to jfe train"
            )
    for env in args.env:
        if not _ENV.fullmatch(env):
            raise UsageError(f"--env {env!r} must be NAME=VALUE")
    run_name = args.run_name or os.path.basename(workdir.rstrip("/")) or "train"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_name):
        raise UsageError(f"--run-name {run_name!r}: use letters, digits, '.', '_', '-'")
    config_name = os.path.basename(args.config)

    flags = [
        f'--config="{REMOTE_RUN}/config/{config_name}"',
        f"--workdir={shlex.quote(workdir)}",
        "--config.train.distributed=True",
    ]
    stage = []
    owned = {"train.distributed": "always True here"}
    for flag, field, local in (
        ("--data", "data.root", "data"),
        ("--init-from", "model.init_from", "init"),
    ):
        source = getattr(args, flag[2:].replace("-", "_"))
        if not source:
            continue
        owned[field] = f"set by {flag}"
        if is_gcs(source):
            target = f"{REMOTE_RUN}/{local}"
            stage.append(f'mkdir -p "{target}"')
            stage.append(f'gcloud storage rsync --recursive {shlex.quote(source)} "{target}"')
            flags.append(f'--config.{field}="{target}"')
        elif source.startswith("/"):
            flags.append(f"--config.{field}={shlex.quote(source)}")  # already on every worker
        else:
            raise UsageError(f"{flag} {source!r} must be gs://BUCKET/PATH or an absolute path")
    if not any(o.startswith("--config.data.tfds_dir=") for o in overrides):
        # Each host prepares its own TFDS copy locally: no races on a shared directory.
        flags.append(f'--config.data.tfds_dir="{REMOTE_RUN}/tfds"')
    for item in overrides:
        field = item[len("--config.") :].split("=", 1)[0]
        if field in owned:
            raise UsageError(f"{item!r} conflicts with this launcher: {field} is {owned[field]}")
        flags.append(shlex.quote(item))

    exports = [f"export {shlex.quote(env)}" for env in args.env]
    inner = ["set -eu", *exports, *stage, f'cd "{REMOTE_RUN}"']
    inner.append(f'exec "{REMOTE_VENV}/bin/jfe" train ' + " ".join(flags))
    log = f"{REMOTE_LOGS}/{run_name}.log"
    script = [
        "set -eu",
        f'mkdir -p "{REMOTE_LOGS}"',
        f'if [ -f "{REMOTE_PID}" ] && kill -0 "$(cat "{REMOTE_PID}")" 2>/dev/null; then '
        'echo "a jfe run is already going on $(hostname); stop it first" >&2; exit 1; fi',
        # '&' ends a command: the pid file is written in the same list entry, not after '; '.
        f'nohup sh -c {shlex.quote("; ".join(inner))} > "{log}" 2>&1 < /dev/null & '
        f'echo $! > "{REMOTE_PID}"',
        f'ln -sfn "{run_name}.log" "{LATEST_LOG}"',
        f'echo "started jfe train on $(hostname), pid $(cat "{REMOTE_PID}"), log {log}"',
    ]
    return [scp(args, args.config, f"jfe-run/config/{config_name}"), ssh(args, script)]


def logs_commands(args) -> list[list[str]]:
    """Shows (or follows) one worker's log of the latest run."""
    if not (args.worker == "all" or args.worker.isdigit()):
        raise UsageError(f"--worker {args.worker!r} must be a worker number or 'all'")
    if args.lines < 1:
        raise UsageError(f"--lines must be positive, got {args.lines}")
    log = f"{REMOTE_LOGS}/{args.run_name}.log" if args.run_name else LATEST_LOG
    follow = " -F" if args.follow else ""
    return [ssh(args, [f'tail -n {args.lines}{follow} "{log}"'], worker=args.worker)]


def stop_commands(args) -> list[list[str]]:
    """SIGTERM (the trainer saves a checkpoint and exits) or SIGKILL on every worker."""
    signal = "KILL" if args.force else "TERM"
    script = [
        f'if [ -f "{REMOTE_PID}" ] && kill -0 "$(cat "{REMOTE_PID}")" 2>/dev/null; then '
        f'kill -{signal} "$(cat "{REMOTE_PID}")" && '
        f'echo "sent SIG{signal} to jfe train on $(hostname)"; '
        'else echo "no jfe run on $(hostname)"; fi'
    ]
    return [ssh(args, script)]


def delete_commands(args) -> list[list[str]]:
    """Deletes the slice (with --queued: the queued resource and its node)."""
    if args.queued:
        return [[*QUEUED_RESOURCES, "delete", args.name, *location(args), "--force", "--quiet"]]
    return [tpu_vm(args, "delete", "--quiet")]


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    common.add_argument("--zone", required=True, help="e.g. us-east5-a")
    common.add_argument("--project", default="", help="default: gcloud's configured project")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    common.add_argument("--yes", action="store_true", help="run the commands (default: print)")

    parser = argparse.ArgumentParser(
        prog="launch/tpu.py",
        description="Run jfe-jax on a Cloud TPU VM slice. Prints the gcloud commands; --yes "
        "runs them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("create", parents=[common], help="create the TPU VM slice")
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-64, v4-32, v6e-8")
    p.add_argument("--runtime-version", default="", help="default: JAX image of the family")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot VMs (preemptible, cheaper)")
    kind.add_argument("--preemptible", action="store_true", help="legacy preemptible TPUs")
    p.add_argument("--queued", action="store_true", help="create through a queued resource")
    p.add_argument("--valid-until-duration", default="", help="queued: give up after, e.g. 6h")

    p = sub.add_parser("setup", parents=[common], help="install jfe-jax on every worker")
    p.add_argument("--repo", default="", help="git URL to clone (needs access from the VMs)")
    p.add_argument("--ref", default="main", help="branch, tag or commit of --repo")
    p.add_argument("--wheel", default="", help="a local jfe_jax-*.whl to copy instead")
    p.add_argument("--python", default="python3.11", help="interpreter for the venv")
    p.add_argument(
        "--extra-packages",
        nargs="*",
        default=["gcsfs", "google-cloud-storage"],
        help="more pip packages; the defaults let Orbax (gcsfs) and TensorBoard "
        "(google-cloud-storage) write to gs://",
    )

    p = sub.add_parser("run", parents=[common], help="start jfe train on every worker")
    p.add_argument("--config", required=True, help="local config file, copied to the workers")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH shared by all workers")
    p.add_argument("--data", default="", help="data.root: gs:// (copied to each VM) or VM path")
    p.add_argument("--init-from", default="", help="model.init_from: gs:// or VM path")
    p.add_argument("--accelerator-type", default="", help="lets single-host runs use local dirs")
    p.add_argument("--run-name", default="", help="log file name (default: workdir basename)")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the trainer")
    p.epilog = "Further --config.KEY=VALUE arguments are passed on to jfe train."

    p = sub.add_parser("logs", parents=[common], help="show one worker's log")
    p.add_argument("--worker", default="0", help="worker number, or 'all'")
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--follow", action="store_true", help="keep printing (tail -F)")
    p.add_argument("--run-name", default="", help="default: the latest run")

    p = sub.add_parser("stop", parents=[common], help="stop the run on every worker")
    p.add_argument("--force", action="store_true", help="SIGKILL instead of SIGTERM")

    p = sub.add_parser("delete", parents=[common], help="delete the slice")
    p.add_argument("--queued", action="store_true", help="it was created with --queued")
    return parser


def plan(argv: Sequence[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    """Parses and validates ``argv``; returns the arguments and the commands to run."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    check_name(args.name)
    check_zone(args.zone)
    builders = {
        "create": create_commands,
        "setup": setup_commands,
        "run": lambda a: run_commands(a, [u for u in unknown if u != "--"]),
        "logs": logs_commands,
        "stop": stop_commands,
        "delete": delete_commands,
    }
    try:
        return args, builders[args.command](args)
    except ValueError as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, commands = plan(argv)
    except UsageError as e:
        print(f"launch/tpu.py: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run or not args.yes:
        why = "--dry-run" if args.dry_run else "add --yes to run them"
        print(f"# {args.command}: {len(commands)} command(s), not run ({why})")
        for command in commands:
            print(shlex.join(command))
        return 0
    if shutil.which("gcloud") is None:
        print(
            "launch/tpu.py: error: gcloud is not on PATH (install the Cloud SDK)", file=sys.stderr
        )
        return 2
    for command in commands:
        print("+ " + shlex.join(command), flush=True)
        try:
            code = subprocess.run(command, check=False).returncode
        except KeyboardInterrupt:
            return 130
        if code:
            print(f"launch/tpu.py: error: exit status {code} from {command[:5]}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
