"""Run a command as root on a kernel with ESP, booted under qemu by virtme-ng (`vng`).

Some kernels (CI's among them) have no ESP, so the kernel tier, the IPsec demo and
its benchmark boot Debian's kernel from /boot instead. The guest sees the host's
root filesystem read-only over 9p, so the repository and its .venv are there at the
same paths; what it writes lands in tmpfs (/tmp, /run, /etc are overlays or tmpfs
inside the guest) and is gone when it stops, except under the `rwdirs`, which are
the host's own folders mounted read-write.

One boot costs ~20-60 s without KVM, so callers run everything they need in one
`run_in_vm`. KVM is off unless QGW_VM_KVM=1: on some hosts qemu's KVM mode aborts
(an MSR it cannot set) where software emulation works.

virtme-ng mounts the root without any cache, so every stat and open is a round trip
to qemu (1-30 ms under emulation) and a Python start with a few hundred imports
spends most of its time there. So the stdlib, the venv's site-packages and the
working directory are also exported as `cached_dirs`: read-only 9p mounts with
cache=loose over the same paths, which the guest caches like a local disk
(a `python -c pass` goes from ~8 s to ~3 s).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from qgw.errors import QgwError

# Loaded before the command runs, so a missing one shows in the first lines of output.
# esp*/xfrm_*: kernel IPsec; aes_generic/gcm/ghash_generic/seqiv: rfc4106(gcm(aes)), the
# ESP AEAD the IPsec gateway installs (not the alias "aes": modprobe resolves it to
# every AES driver and fails on padlock's); veth/bridge: qgw.netlab's namespaces.
KERNEL_MODULES = ("esp4", "esp6", "xfrm_user", "xfrm_algo", "aes_generic", "gcm",
                  "ghash_generic", "seqiv", "veth", "bridge")

# Printed by the guest around the command: seeing READY proves the kernel booted and
# the guest reached our script; EXIT carries the command's own status, so a guest
# that dies mid-command (panic, OOM) is not mistaken for the command failing.
READY = "qgw-vm: ready"
EXIT = "qgw-vm: exit "

# The guest mounts fresh tmpfs here, hiding the host's files: a working directory
# below one of them would not exist in the guest.
# (S108: names to stay away from, not files this module makes.)
GUEST_TMPFS = tuple(Path(p) for p in (
    "/run", "/var/tmp", "/var/log", "/var/cache",  # noqa: S108
    "/var/lib/apt", "/var/lib/private", "/dev/shm"))  # noqa: S108

TAIL_CHARS = 4000
NINEP = "trans=virtio,version=9p2000.L,msize=524288"


@dataclass(frozen=True)
class VmResult:
    returncode: int
    output: str              # everything the guest printed (stdout and stderr)
    boot_s: float | None     # host seconds from launching vng until the command started

    def tail(self, chars: int = TAIL_CHARS) -> str:
        return self.output[-chars:]


def _version_key(release: str) -> tuple[tuple[int, str], ...]:
    """Orders '6.1.0-50-amd64' after '6.1.0-9-amd64' (numbers compare as numbers)."""
    return tuple((int(part), "") if part.isdigit() else (-1, part)
                 for part in re.split(r"(\d+)", release) if part)


def _has_esp(release: str) -> bool:
    """Whether /lib/modules/<release> provides ESP, built in or as a module."""
    modules = Path("/lib/modules") / release
    for listing in ("modules.dep", "modules.builtin"):
        with contextlib.suppress(OSError):
            if re.search(r"/esp4\.ko", (modules / listing).read_text()):
                return True
    return False


def find_kernel() -> Path | None:
    """The newest /boot/vmlinuz-<release> whose /lib/modules/<release> has ESP.

    That rules out the running kernel where it lacks ESP or its modules (as on CI)
    and picks Debian's linux-image kernels. QGW_VM_KERNEL names one explicitly.
    """
    explicit = os.environ.get("QGW_VM_KERNEL")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    candidates = [path for path in Path("/boot").glob("vmlinuz-*")
                  if path.is_file() and _has_esp(path.name.removeprefix("vmlinuz-"))]
    return max(candidates, key=lambda p: _version_key(p.name), default=None)


def _vng() -> str | None:
    # Beside this interpreter first: a venv's scripts are not on PATH unless activated.
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.is_file() else shutil.which("vng")


def _is_static_elf(path: Path) -> bool:
    """An ELF without a program interpreter (PT_INTERP) needs no dynamic loader."""
    try:
        with path.open("rb") as f:
            header = f.read(64)
            if header[:5] != b"\x7fELF\x02":  # 64-bit ELF
                return False
            phoff, = struct.unpack_from("<Q", header, 32)
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except (OSError, struct.error):
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _static_busybox() -> Path | None:
    # virtme-ng builds its initramfs from busybox and looks for it under these names.
    for name in ("busybox-static", "busybox.static", "busybox"):
        found = shutil.which(name, path=os.pathsep.join(
            [os.environ.get("PATH", ""), "/bin", "/usr/bin", "/sbin", "/usr/sbin"]))
        if found and _is_static_elf(Path(found)):
            return Path(found)
    return None


def unavailable() -> str | None:
    """Why a kernel VM cannot be booted here (None: it can)."""
    if os.geteuid() != 0:
        return "the kernel VM needs root (run as root or with sudo)"
    if _vng() is None:
        return "needs virtme-ng's vng (scripts/setup test installs it into .venv)"
    if shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86 (apt-get install qemu-system-x86)"
    if _static_busybox() is None:
        return "needs busybox-static (apt-get install busybox-static)"
    if find_kernel() is None:
        return ("needs a kernel with ESP modules in /boot and /lib/modules "
                "(apt-get install linux-image-amd64)")
    return None


def _use_kvm(kvm: bool | None) -> bool:
    if kvm is not None:
        return kvm
    return os.environ.get("QGW_VM_KVM") == "1" and Path("/dev/kvm").exists()


def default_cached_dirs(cwd: Path) -> list[Path]:
    """What a Python command in `cwd` reads most: the stdlib, site-packages, `cwd`."""
    paths = sysconfig.get_paths()
    return [Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"]), cwd]


def _cache_plan(dirs: Sequence[Path], rwdirs: Sequence[Path]) -> list[Path]:
    """The `dirs` worth a cached mount, parents first (a child's mount would be hidden)."""
    chosen: list[Path] = []
    for path in sorted({d.resolve() for d in dirs}, key=lambda p: len(p.parts)):
        inside_chosen = any(c == path or c in path.parents for c in chosen)
        # A read-only mount over or under an rwdir would hide it or make it read-only.
        near_rwdir = any(r == path or r in path.parents or path in r.parents for r in rwdirs)
        # qemu splits options at commas, vng at spaces; "/" or "/usr" would cover too much.
        awkward = len(path.parts) <= 2 or re.search(r"[,\s]", str(path)) is not None
        if path.is_dir() and not (inside_chosen or near_rwdir or awkward):
            chosen.append(path)
    return chosen


def _script(command: str | list[str], cwd: Path, env: dict[str, str],
            cached: Sequence[Path] = ()) -> str:
    """The guest's shell script: markers, cached mounts, modules, environment, command."""
    run = command if isinstance(command, str) else shlex.join(command)
    mounts = "".join(
        f"mount -t 9p -o {NINEP},cache=loose,ro qgwcache{i} {shlex.quote(str(path))} "
        f"|| echo 'qgw-vm: reading {path} uncached'\n" for i, path in enumerate(cached))
    exports = "".join(f"export {name}={shlex.quote(value)}\n"
                      for name, value in sorted(env.items()))
    return (
        f"echo \"{READY} $(cut -d' ' -f1 /proc/uptime)\"\n"
        f"{mounts}"
        f"for m in {' '.join(KERNEL_MODULES)}; do modprobe $m || missing=\"$missing $m\"; "
        "done\n"
        "[ -z \"$missing\" ] || echo \"qgw-vm: modules that did not load:$missing\"\n"
        f"{exports}"
        f"cd {shlex.quote(str(cwd))} || exit 125\n"
        # A subshell, so that an `exit` in the command still reaches the EXIT line.
        f"(\n{run}\n)\n"
        "rc=$?\n"
        f"echo \"{EXIT}$rc\"\n"
        "exit $rc\n"
    )


def _guest_env(env: dict[str, str] | None, kvm: bool) -> dict[str, str]:
    bad = [name for name in env or {} if not re.fullmatch(r"[A-Za-z_]\w*", name, re.ASCII)]
    if bad:
        raise QgwError(f"kernel VM: not environment variable names: {bad}")
    bin_dir = str(Path(sys.executable).parent)
    base = {
        "HOME": "/root",
        "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "QGW_IN_VM": "1",
        # Without KVM everything runs ~10-40x slower (a Python start takes seconds):
        # tests that wait for processes can scale their deadlines by it.
        "QGW_VM_EMULATED": "0" if kvm else "1",
        # The root filesystem is read-only in the guest: skip failing .pyc writes.
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",  # lines arrive as they are printed, for on_line
    }
    return {**base, **(env or {})}


def _check_visible(*paths: Path) -> None:
    for path in paths:
        if not path.is_dir():
            raise QgwError(f"kernel VM: {path} is not a directory")
        for hidden in GUEST_TMPFS:
            if path == hidden or hidden in path.parents:
                raise QgwError(f"kernel VM: {path} is under {hidden}, which the guest "
                               "replaces with an empty tmpfs; use a folder elsewhere")


def vng_argv(script: Path, *, cwd: Path, rwdirs: Sequence[Path], memory: str, cpus: int,
             kvm: bool, cached: Sequence[Path] = ()) -> list[str]:
    """The vng command line that boots the kernel and runs `script` as root."""
    vng, kernel = _vng(), find_kernel()
    if vng is None or kernel is None:
        raise QgwError(f"kernel VM: {unavailable()}")
    argv = [vng, "--run", str(kernel), "--user", "root", "--memory", memory,
            "--cpus", str(cpus), "--cwd", str(cwd)]
    if not kvm:
        argv.append("--disable-kvm")
    for rwdir in rwdirs:
        argv += ["--rwdir", str(rwdir)]
    for i, path in enumerate(cached):
        # "--qemu-opts=": a separate value starting with "-" would read as an option.
        argv.append(f"--qemu-opts=-fsdev local,id=qgwcache{i},path={path},security_model=none,"
                    f"readonly=on,multidevs=remap -device virtio-9p-pci,fsdev=qgwcache{i},"
                    f"mount_tag=qgwcache{i}")
    # The script goes by path: vng passes --exec on the kernel command line, whose
    # 2 KiB limit a long environment would exceed.
    return [*argv, "--exec", f"sh {shlex.quote(str(script))}"]


def _read_lines(stream: queue.Queue[str | None], pipe: IO[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):  # the pipe closed under us: done
        for raw in pipe:
            stream.put(raw.decode(errors="replace").rstrip("\r\n"))
    stream.put(None)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # vng, virtme-run and qemu share the session started for them. SIGTERM first:
    # it lets vng remove its temporary files.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
            return


def run_in_vm(command: str | list[str], *, cwd: Path, env: dict[str, str] | None = None,
              rwdirs: Sequence[Path] = (), memory: str = "2G", cpus: int = 2,
              timeout_s: float = 900, kvm: bool | None = None,
              on_line: Callable[[str], None] | None = None,
              cached_dirs: Sequence[Path] | None = None) -> VmResult:
    """Boot the ESP kernel, run `command` as root in `cwd`, return its status and output.

    `command` is a shell string or an argv. `env` is added to a minimal guest
    environment (PATH starts with this interpreter's bin folder; QGW_IN_VM=1;
    QGW_VM_EMULATED=1 without KVM).
    Only `rwdirs` outlive the guest. `cached_dirs` (default: default_cached_dirs)
    are read-only in the guest even where the root's overlays would let it write (a
    clone under /tmp); pass () to read everything through the uncached root.
    Raises QgwError, with the output's tail, if the guest does not boot, dies
    before the command finishes, or `timeout_s` passes.
    """
    why = unavailable()
    if why is not None:
        raise QgwError(f"kernel VM: {why}")
    cwd, rwdirs = cwd.resolve(), [Path(d).resolve() for d in rwdirs]
    _check_visible(cwd, *rwdirs)
    with tempfile.TemporaryDirectory(prefix="qgw-vm-") as scratch:
        _check_visible(Path(scratch))
        script = Path(scratch) / "run.sh"
        cached = _cache_plan(default_cached_dirs(cwd) if cached_dirs is None else cached_dirs,
                             [*rwdirs, Path(scratch)])
        use_kvm = _use_kvm(kvm)
        script.write_text(_script(command, cwd, _guest_env(env, use_kvm), cached))
        argv = vng_argv(script, cwd=cwd, rwdirs=rwdirs, memory=memory, cpus=cpus,
                        kvm=use_kvm, cached=cached)
        return _supervise(argv, cwd, timeout_s, on_line)


def _supervise(argv: list[str], cwd: Path, timeout_s: float,
               on_line: Callable[[str], None] | None) -> VmResult:
    started = time.monotonic()
    deadline = started + timeout_s
    lines: list[str] = []
    boot_s: float | None = None
    status: int | None = None
    # vng runs virtme-run by name: it must find the one beside itself.
    path = os.pathsep.join([str(Path(argv[0]).parent), os.environ.get("PATH", os.defpath)])
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, "PATH": path},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    stream: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    reader = threading.Thread(target=_read_lines, args=(stream, proc.stdout), daemon=True)
    reader.start()
    try:
        while True:
            try:
                line = stream.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise QgwError(f"kernel VM: no result within {timeout_s:.0f} s; last output:\n"
                               + "\n".join(lines)[-TAIL_CHARS:]) from None
            if line is None:
                break
            lines.append(line)
            if boot_s is None and line.startswith(READY):
                boot_s = time.monotonic() - started
            elif line.startswith(EXIT) and line[len(EXIT):].isdigit():
                status = int(line[len(EXIT):])
            if on_line is not None:
                on_line(line)
    except BaseException:
        _stop(proc)
        raise
    finally:
        reader.join(timeout=30)
        proc.stdout.close()
    try:
        proc.wait(timeout=60)  # the guest has printed all; qemu is shutting down
    except subprocess.TimeoutExpired:
        _stop(proc)
    output = "\n".join(lines)
    if boot_s is None:
        raise QgwError(f"kernel VM did not boot (vng exit status {proc.returncode}); "
                       f"output:\n{output[-TAIL_CHARS:]}")
    if status is None:
        raise QgwError("kernel VM stopped before the command finished (a kernel panic "
                       f"or the guest out of memory?); output:\n{output[-TAIL_CHARS:]}")
    return VmResult(returncode=status, output=output, boot_s=boot_s)
