"""The images the deployment test runs, built from what this machine reaches.

No image registry is reachable, so the base is a local Debian bookworm (mmdebstrap
``--variant=minbase`` with python3, written straight to a tarball and imported with
``docker import``), the application image is ``Dockerfile`` on that base (``BASE_IMAGE``),
and Mosquitto, Redis and Prometheus are stand-ins built from Debian's packages
(tests/deploy/images/) under the names and tags docker-compose.yml uses. A real image
already under such a tag is kept.

The engine's layer cache makes a second build a cache hit; the base is imported from
.deploy-cache/ (ignored by git) if the engine lost it, and bootstrapped only when its
recipe changes. The host's CA bundle reaches pip as a BuildKit secret, never a layer.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Final

from .engine import Client

REPO: Final = Path(__file__).resolve().parents[2]
CACHE: Final = REPO / ".deploy-cache"
STANDINS: Final = Path(__file__).resolve().parent / "images"
CA_BUNDLE: Final = Path("/etc/ssl/certs/ca-certificates.crt")
APP_IMAGE: Final = "iot-orders:latest"
STANDIN_LABEL: Final = "org.iot-orders.stand-in"
# (Dockerfile, tag) as docker-compose.yml names them.
STANDIN_IMAGES: Final = (
    ("mosquitto.Dockerfile", "eclipse-mosquitto:2.0"),
    ("redis.Dockerfile", "redis:7"),
    ("prometheus.Dockerfile", "prom/prometheus:v2.53.0"),
)
# dpkg's unsafe-io: no fsync per unpacked file (a throwaway rootfs; this halved the
# bootstrap on a loaded 2-core machine). Translations, documentation and manuals are never
# unpacked. Both stay in the image's /etc/dpkg/dpkg.cfg.d/99mmdebstrap, so they hold for the
# stand-ins' `apt-get install` too, which needs no update: the package lists stay.
MMDEBSTRAP: Final = (
    "mmdebstrap", "--variant=minbase", "--include=python3,python3-venv", "--format=tar",
    "--dpkgopt=force-unsafe-io", "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--skip=cleanup/apt/lists", "bookworm", "{tarball}", "http://deb.debian.org/debian",
)  # fmt: skip
PATH_ENV: Final = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT_S: Final = 900


def base_tag() -> str:
    """The base image's tag: a digest of its recipe, so a changed recipe builds anew."""
    recipe = repr((MMDEBSTRAP, PATH_ENV)).encode()
    return f"iot-orders/bookworm-base:{hashlib.sha256(recipe).hexdigest()[:12]}"


def _run(argv: list[str], client: Client, timeout_s: float = BUILD_TIMEOUT_S) -> str:
    done = subprocess.run(
        argv, capture_output=True, text=True, env=client.env(), timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done.stdout


def image_labels(client: Client, tag: str) -> dict[str, str] | None:
    """The labels of the image ``tag``, or None when the engine has no such image."""
    done = subprocess.run(
        [client.path, "image", "inspect", "--format", "{{json .Config.Labels}}", tag],
        capture_output=True, text=True, check=False, timeout=60, env=client.env(),
    )  # fmt: skip
    if done.returncode != 0:
        return None
    labels: dict[str, str] | None = json.loads(done.stdout)
    return labels or {}


def ensure_base(client: Client) -> str:
    """The local Debian base image: in the engine, else from the cached tarball, else built."""
    tag = base_tag()
    if image_labels(client, tag) is not None:
        return tag
    tarball = CACHE / f"{tag.split(':')[1]}.tar"
    if not tarball.exists():
        CACHE.mkdir(exist_ok=True)
        partial = tarball.with_suffix(".partial")
        _run([part.format(tarball=partial) for part in MMDEBSTRAP], client)
        partial.rename(tarball)
    _run([client.path, "import", "--change", PATH_ENV, str(tarball), tag], client)
    return tag


def build_argv(client: Client, base: str, dockerfile: Path, tag: str, context: Path) -> list[str]:
    """A BuildKit build of ``dockerfile`` on ``base``, the CA bundle as the secret ``ca``."""
    return [
        *client.build_argv(), "--quiet", "--build-arg", f"BASE_IMAGE={base}",
        "--secret", f"id=ca,src={CA_BUNDLE}", "--file", str(dockerfile), "--tag", tag,
        str(context),
    ]  # fmt: skip


def build_all(client: Client) -> list[str]:
    """Build the base, the application image and the stand-ins (those together); their tags."""
    base = ensure_base(client)
    builds = [(REPO / "Dockerfile", APP_IMAGE, REPO)]
    for dockerfile, tag in STANDIN_IMAGES:
        labels = image_labels(client, tag)
        if labels is None or STANDIN_LABEL in labels:
            builds.append((STANDINS / dockerfile, tag, STANDINS))
    running = [
        (tag, subprocess.Popen(
            build_argv(client, base, dockerfile, tag, context), env=client.env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))
        for dockerfile, tag, context in builds
    ]  # fmt: skip
    failed = []
    for tag, proc in running:
        _, err = proc.communicate(timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            failed.append(f"{tag} (exit {proc.returncode}):\n{err[-3000:]}")
    if failed:
        raise RuntimeError("image builds failed:\n" + "\n".join(failed))
    return [base, *(tag for _, tag, _ in builds)]
