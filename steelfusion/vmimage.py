"""The Linux guest image of ``steelfusion vm`` (issue 11): built from Debian packages, cached.

The recipe is ``vagrant/uml/recipe.toml`` (suite, packages, systemd units to mask or
enable) plus the files under ``vagrant/uml/rootfs/`` that go into the image as they are.
``mmdebstrap`` builds the root directory (no loop device, no mount), the kernel modules of
the host's ``user-mode-linux`` package are copied in (the guest kernel is that package's
``linux.uml``), and ``mke2fs -d`` turns the directory into an ext4 image file.

Images are kept outside the work tree, in ``/var/cache/steelfusion/vm/<key>/`` (or
``$STEELFUSION_VM_CACHE``), where ``key`` hashes the recipe, the rootfs files and the UML
kernel's version: an unchanged recipe is never built twice, a changed one gets a new image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from steelfusion import log

_log = log.get("vmimage")

RECIPE_DIR = Path(__file__).resolve().parent.parent / "vagrant" / "uml"
CACHE_DIR = Path("/var/cache/steelfusion/vm")
UML_KERNEL = "/usr/bin/linux.uml"
UML_MODULES = Path("/usr/lib/uml/modules")
IMAGE_FILE = "rootfs.img"
META_FILE = "image.json"
#: packages whose versions an image's ``image.json`` records (the report's versions)
REPORTED = ("open-iscsi", "python3-rtslib-fb", "targetcli-fb", "e2fsprogs", "xfsprogs", "fio",
            "systemd", "sg3-utils")


class VmError(Exception):
    """Building or booting a guest failed, or cannot be done here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What goes into an image: ``recipe.toml`` and the folder of files copied in."""

    suite: str
    variant: str
    size: str
    packages: tuple[str, ...]
    mask: tuple[str, ...]
    enable: tuple[str, ...]
    root: Path

    @classmethod
    def load(cls, folder: Path = RECIPE_DIR) -> Recipe:
        path = folder / "recipe.toml"
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise VmError(f"cannot read the guest recipe {path}: {e}") from None
        try:
            return cls(suite=str(raw["suite"]), variant=str(raw.get("variant", "minbase")),
                       size=str(raw.get("size", "2G")),
                       packages=tuple(str(p) for p in raw["packages"]),
                       mask=tuple(str(u) for u in raw.get("mask", ())),
                       enable=tuple(str(u) for u in raw.get("enable", ())),
                       root=folder / "rootfs")
        except (KeyError, TypeError) as e:
            raise VmError(f"{path}: missing or bad key {e}") from None

    def files(self) -> Iterator[Path]:
        """The files copied into the image, in a stable order."""
        if self.root.is_dir():
            yield from sorted(p for p in self.root.rglob("*") if p.is_file())

    def key(self) -> str:
        """16 hex characters naming this recipe with this host's UML kernel."""
        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self) | {"root": ""}, sort_keys=True).encode())
        for f in self.files():
            h.update(f"\0{f.relative_to(self.root)}\0{f.stat().st_mode & 0o777:o}\0".encode())
            h.update(f.read_bytes())
        h.update(f"\0uml={uml_version()}".encode())
        return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("STEELFUSION_VM_CACHE") or CACHE_DIR)


def uml_version() -> str:
    """The installed user-mode-linux package's version and its kernel release ("" if none)."""
    if not UML_MODULES.is_dir():
        return ""
    releases = ",".join(sorted(p.name for p in UML_MODULES.iterdir()))
    return f"{_dpkg_version('user-mode-linux')} kernel {releases}"


def _dpkg_version(pkg: str, admindir: Path | None = None) -> str:
    cmd = ["dpkg-query", "-W", "-f", "${Version}", pkg]
    if admindir is not None:
        cmd.insert(1, f"--admindir={admindir}")
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return p.stdout.strip() if p.returncode == 0 else ""


def missing_tools() -> str | None:
    """What this host lacks to build and boot guests (None: nothing), with the fix."""
    if os.geteuid() != 0:
        return ("needs root (mmdebstrap builds the image as root; the tap device needs "
                "CAP_NET_ADMIN)")
    lacks = [pkg for tool, pkg in (("mmdebstrap", "mmdebstrap"), ("linux.uml", "user-mode-linux"),
                                   ("mke2fs", "e2fsprogs"))
             if shutil.which(tool) is None]
    if not UML_MODULES.is_dir() and "user-mode-linux" not in lacks:
        lacks.append("user-mode-linux")
    if lacks:
        return (f"missing Debian packages: {' '.join(lacks)} (apt-get install "
                f"{' '.join(lacks)}; `make test-vm` does it as root)")
    return None


@dataclasses.dataclass(frozen=True)
class Image:
    """A built image: its file and what ``image.json`` says about it."""

    path: Path
    meta: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.meta.get("key", ""))


def cached(recipe: Recipe | None = None) -> Image | None:
    """The image of ``recipe`` if it is in the cache."""
    recipe = recipe or Recipe.load()
    d = cache_dir() / recipe.key()
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    img = d / IMAGE_FILE
    return Image(img, meta) if img.is_file() else None


def apt_sources(suite: str, sources: Path = Path("/etc/apt")) -> list[str]:
    """One-line ``deb URI SUITE COMPONENTS`` entries for ``suite`` from this host's apt
    sources (deb822 ``*.sources`` and ``sources.list``), so the image comes from the mirrors
    this machine already uses; deb.debian.org when none serves ``suite``."""
    out: list[str] = []
    for f in sorted((sources / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", f.read_text()):
                kv: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    kv[k.strip().lower()] = v.strip()
                if "deb" not in kv.get("types", "").split() or kv.get("enabled") == "no":
                    continue
                for uri in kv.get("uris", "").split():
                    for s in kv.get("suites", "").split():
                        out.append(f"deb {uri} {s} {kv.get('components', 'main')}")
    with contextlib.suppress(OSError):
        for line in (sources / "sources.list").read_text().splitlines():
            parts = line.split("#", 1)[0].split()
            if parts[:1] == ["deb"] and not parts[1].startswith("["):
                out.append(" ".join(parts))
    mine = [ln for ln in out if ln.split()[2].split("-")[0] == suite]
    if mine:
        return mine
    return [f"deb http://deb.debian.org/debian {suite} main",
            f"deb http://deb.debian.org/debian {suite}-updates main",
            f"deb http://deb.debian.org/debian-security {suite}-security main"]


def build(recipe: Recipe | None = None, *, force: bool = False,
          say: Callable[[str], None] = lambda s: None) -> Image:
    """The image of ``recipe``: from the cache, else built (a few minutes at most).

    A build goes to a temporary folder beside the cache entry and is renamed into place
    only when complete, so an interrupted build leaves no image that looks whole.
    """
    why = missing_tools()
    if why is not None:
        raise VmError(f"cannot build the guest image: {why}")
    recipe = recipe or Recipe.load()
    key = recipe.key()
    if not force:
        img = cached(recipe)
        if img is not None:
            return img
    base = cache_dir()
    final = base / key
    work = base / f".{key}.build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        meta = _build_into(recipe, key, work, say)
        if force and final.exists():
            shutil.rmtree(final)
        try:
            work.rename(final)
        except OSError:  # another build of the same recipe finished first: use that one
            shutil.rmtree(work, ignore_errors=True)
            img = cached(recipe)
            if img is None:
                raise
            return img
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _log.info("vm_image_built", key=key, seconds=meta["build_seconds"])
    return Image(final / IMAGE_FILE, meta)


def _build_into(recipe: Recipe, key: str, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    root = work / "rootfs"
    enable = (f"chroot \"$1\" systemctl enable {' '.join(recipe.enable)} >/dev/null 2>&1; "
              if recipe.enable else "")
    mask = (f"chroot \"$1\" systemctl mask {' '.join(recipe.mask)} >/dev/null 2>&1 || true; "
            if recipe.mask else "")
    setup = ("set -e; echo sfguest > \"$1/etc/hostname\"; chroot \"$1\" passwd -d root >/dev/null; "
             "printf '/dev/ubda / ext4 rw,noatime 0 1\\n' > \"$1/etc/fstab\"; "
             f"mkdir -p \"$1/lib/modules\"; cp -a {UML_MODULES}/. \"$1/lib/modules/\"; "
             f"{enable}{mask}"
             "rm -rf \"$1\"/var/cache/apt/archives/*.deb \"$1\"/var/lib/apt/lists/*")
    cmd = ["mmdebstrap", "--quiet", f"--variant={recipe.variant}",
           f"--include={','.join(recipe.packages)}",
           # no documentation in a throwaway guest: less to unpack
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
           "--dpkgopt=path-exclude=/usr/share/locale/*",
           "--dpkgopt=path-include=/usr/share/doc/*/copyright",
           f"--customize-hook=sync-in {recipe.root} /",
           f"--customize-hook={setup}",
           recipe.suite, str(root), *apt_sources(recipe.suite)]
    t0 = time.monotonic()
    say(f"mmdebstrap {recipe.suite} ({len(recipe.packages)} packages) into {root}")
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise VmError(f"mmdebstrap failed ({p.returncode}): "
                      f"{(p.stderr or p.stdout).strip()[-1500:]}")
    t1 = time.monotonic()
    versions = {pkg: _dpkg_version(pkg, root / "var/lib/dpkg") for pkg in REPORTED}
    img = work / IMAGE_FILE
    say(f"mke2fs -d {root} -> {img} ({recipe.size}, sparse)")
    p = subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "sfguest", "-d", str(root), str(img),
                        recipe.size], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise VmError(f"mke2fs -d failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    t2 = time.monotonic()
    shutil.rmtree(root)
    meta = {"key": key, "suite": recipe.suite, "packages": list(recipe.packages),
            "versions": versions, "uml": uml_version(), "built": time.time(),
            "build_seconds": round(t2 - t0, 1), "mmdebstrap_seconds": round(t1 - t0, 1),
            "mke2fs_seconds": round(t2 - t1, 1),
            "allocated_bytes": img.stat().st_blocks * 512}
    (work / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def prune(keep: str) -> list[str]:
    """Remove the cached images other than ``keep`` (old recipes); returns their keys."""
    gone: list[str] = []
    base = cache_dir()
    if not base.is_dir():
        return gone
    for d in base.iterdir():
        if d.is_dir() and d.name != keep and re.fullmatch(r"[0-9a-f]{16}", d.name):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone
