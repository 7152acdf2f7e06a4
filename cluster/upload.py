"""What of this checkout a job may carry to a cluster: git's view of the project, minus anything secret.

The list comes from git (tracked files plus untracked files git does not ignore: `.gitignore` at any depth,
`.git/info/exclude` and the user's global excludes all count), then every path with a secret-looking name is
withheld, tracked or not. The result is zipped here and handed to Ray as the job's ``working_dir``: Ray uploads
that zip byte for byte (it ignores ``excludes`` for archives), so the listing printed is exactly what leaves the
machine. Ray's own directory walk would honour only ``.gitignore`` files and our ``excludes``.
"""
from __future__ import annotations

import fnmatch
import os
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Names never uploaded, matched (case-insensitively) against every component of a path, so a directory name
# withholds everything under it. Keys, certificates, cloud and package-index credentials, Ray's own token.
SECRET_NAMES = (
    ".env", ".env*", "*.env", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.kdbx",
    "*.ovpn", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc", "_netrc", ".git-credentials",
    ".pypirc", ".npmrc", ".htpasswd", "credentials*", "*credentials.json", "service-account*.json",
    "auth_token", ".aws", ".ssh", ".gnupg", ".kube", ".docker", "gcloud", ".azure", "*.tfstate", "*.tfvars",
)
DEFAULT_LIMIT_MB = 64
# A fixed timestamp for every zip entry: the same files give the same zip, hence the same content-addressed
# package URI, and Ray skips re-uploading a package the cluster already has.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class UploadError(ValueError):
    """The checkout cannot be shipped as it is; the message says what to change."""


def secret_name(rel_path: str) -> str | None:
    """The pattern that withholds ``rel_path`` (a /-separated path in the checkout), or None."""
    for part in rel_path.lower().split("/"):
        for pattern in SECRET_NAMES:
            if fnmatch.fnmatchcase(part, pattern):
                return pattern
    return None


@dataclass(frozen=True)
class UploadPlan:
    root: Path
    files: tuple[tuple[str, int], ...]  # (path relative to root, bytes), sorted by path
    withheld: tuple[tuple[str, str], ...]  # (path, why): files git would ship that never leave the machine

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def biggest(self, n: int = 5) -> list[tuple[str, int]]:
        return sorted(self.files, key=lambda f: -f[1])[:n]

    def summary(self) -> str:
        return f"{len(self.files)} files, {human_bytes(self.total_bytes)} from {self.root}"

    def check_limit(self, limit_mb: float) -> None:
        if self.total_bytes > limit_mb * 1024 * 1024:
            top = ", ".join(f"{path} ({human_bytes(size)})" for path, size in self.biggest())
            raise UploadError(f"the upload would be {self.summary()}, over the {limit_mb:g} MiB limit; biggest: "
                              f"{top}. Add what the job does not need to .gitignore or .git/info/exclude, put "
                              f"data on shared storage, or raise --max-upload-mb")

    def write_zip(self, path: Path) -> Path:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel, _ in self.files:
                source = self.root / rel
                info = zipfile.ZipInfo(rel, date_time=_ZIP_EPOCH)
                info.external_attr = (source.stat().st_mode & 0o777) << 16  # keep scripts executable
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, source.read_bytes())
        return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _git_files(root: Path) -> list[str]:
    cmd = ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True).stdout
    except FileNotFoundError:
        raise UploadError("git is not installed: raylm ships only what git tracks or would track; install git, "
                          "or pass --no-working-dir when the cluster's image holds the project") from None
    except subprocess.CalledProcessError as exc:
        raise UploadError(f"{root} is not a usable git checkout ({exc.stderr.decode().strip()}): raylm ships only "
                          f"what git tracks or would track; pass --no-working-dir when the cluster's image "
                          f"holds the project") from None
    return sorted({p for p in out.decode().split("\0") if p})


def _safe_link(path: Path, root: Path) -> bool:
    """A symlink is zipped as its target's content: only targets inside the checkout, not secret themselves."""
    target = path.resolve()
    return target.is_relative_to(root) and not secret_name(target.relative_to(root).as_posix())


def plan_upload(root: Path) -> UploadPlan:
    root = Path(root).resolve()
    files, withheld = [], []
    for rel in _git_files(root):
        path = root / rel
        pattern = secret_name(rel)
        if pattern:
            withheld.append((rel, f"secret-looking name ({pattern})"))
        elif path.is_symlink() and not _safe_link(path, root):
            withheld.append((rel, f"symlink to {os.readlink(path)}: out of the checkout or to a secret"))
        elif path.is_file():  # not deleted since it was tracked; not a submodule's directory
            files.append((rel, path.stat().st_size))
    return UploadPlan(root=root, files=tuple(files), withheld=tuple(withheld))
