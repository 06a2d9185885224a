"""The cgroup v2 test VM: Debian bookworm's own kernel (6.1) under QEMU, the repository shared in.

    vm = Vm()                                   # builds the image on first use (cached)
    run = vm.run("python3 -m pytest tests/vm/guest", outdir, timeout=1800)
    run.rc, run.log, run.console, run.seconds   # exit code, job output, serial console

The image comes from scripts/vm/build-image.sh (cached under /var/cache/dbguard-vm by a hash of
the build script). Each boot starts from the pristine image (QEMU's snapshot=on: the guest's
writes are thrown away), mounts the repository read-only over 9p at /repo and `outdir` read-write
at /out, runs the job as root from /repo in the guest's root cgroup, and powers off. KVM is used
when DBGUARD_VM_ACCEL=kvm says so; the default is TCG, since KVM did not start a guest on the
machines here ("failed to set MSR" with -cpu host, a silent hang with qemu64).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dbguard.errors import DbguardError
from lab import pace

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "scripts" / "vm" / "build-image.sh"
QEMU = "qemu-system-x86_64"
MEMORY_MIB = 2048
CPUS = 2
APPEND = "root=/dev/vda rw console=ttyS0 psi=1 systemd.unified_cgroup_hierarchy=1 quiet"


@dataclass
class VmRun:
    rc: int | None            # the job's exit code; None when it never finished (timeout, boot failure)
    log: str                  # the job's stdout and stderr
    console: str              # the guest's serial console
    seconds: float            # wall time from QEMU's start to its exit
    booted_after: float | None  # guest uptime when the job started (from the console line)

    def why(self) -> str:
        """One line for a failure: what the guest said last."""
        tail = [ln for ln in (self.log or self.console).splitlines() if ln.strip()][-3:]
        return " | ".join(tail) or "no output"


def image_dir() -> Path:
    """The cached image's directory, built first when missing (a few minutes, once)."""
    if os.geteuid() != 0:
        raise DbguardError("the test VM needs root (debootstrap, 9p shares): run as root")
    if shutil.which(QEMU) is None:
        raise DbguardError(f"{QEMU} not found: apt-get install qemu-system-x86 (make setup installs it)")
    # The build's pip (downloading dbguard's dependencies for the guest) is this interpreter's.
    p = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True,
                       env=dict(os.environ, DBGUARD_VM_PYTHON=sys.executable))
    if p.returncode != 0:
        last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise DbguardError(f"building the test VM image failed: {last[0]} (run {BUILD} to see all)")
    return Path(p.stdout.split()[-1])


def _accel() -> list[str]:
    accel = os.environ.get("DBGUARD_VM_ACCEL", "tcg")
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def qemu_command(image: Path, outdir: Path) -> list[str]:
    share = "security_model=none,multidevs=remap"
    return [QEMU, *_accel(), "-smp", str(CPUS), "-m", str(MEMORY_MIB),
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"), "-append", APPEND,
            "-drive", f"file={image / 'root.img'},if=virtio,format=raw,snapshot=on",
            "-virtfs", f"local,path={REPO},mount_tag=repo,{share},readonly=on",
            "-virtfs", f"local,path={outdir},mount_tag=out,{share}",
            "-nic", "none", "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{outdir / 'console.log'}"]


class Vm:
    def __init__(self, image: Path | None = None):
        self.image = image or image_dir()

    def run(self, job: str, outdir: Path, timeout: float) -> VmRun:
        """Boot, run the shell text `job` in /repo as root, power off; `outdir` is /out."""
        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        for name in ("job.log", "job.rc", "console.log"):
            (outdir / name).unlink(missing_ok=True)
        # The guest's slowdown against the host as it is now (lab/pace.py): the lab's waits stretch by it.
        measure = (f"export {pace.ENV}=$(python3 -m lab.pace --against {pace.work_seconds():.6f})\n"
                   f"echo \"dbguard-vm: the guest runs ${pace.ENV} times slower than the host\"\n")
        (outdir / "job.sh").write_text("set -u\nexport DBGUARD_VM_GUEST=1 PYTHONDONTWRITEBYTECODE=1\n" + measure + job + "\n")
        t0 = time.monotonic()
        proc = subprocess.Popen(qemu_command(self.image, outdir), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            qemu_out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            qemu_out, _ = proc.communicate()
        seconds = time.monotonic() - t0
        console = _read(outdir / "console.log") + qemu_out.decode(errors="replace")
        rc_text = _read(outdir / "job.rc").strip()
        return VmRun(rc=int(rc_text) if rc_text.lstrip("-").isdigit() else None, log=_read(outdir / "job.log"),
                     console=console, seconds=seconds, booted_after=_boot_seconds(console))


def _boot_seconds(console: str) -> float | None:
    for line in console.splitlines():
        if "dbguard-vm: job starting," in line:
            try:
                return float(line.split("job starting,")[1].split()[0])
            except (IndexError, ValueError):
                return None
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
