"""The Triton model repository the registry owns: <root>/<model>/<version>/... plus config.pbtxt.

Versions appear by one atomic rename of a fully written, fsynced staging folder, so a crash at any
moment leaves either no version folder or a whole one. Folders no database row accounts for (a crash
between the rename and the commit) are removed at start-up.

Uploads are staged in <root>/<model>/.staging/: on the same filesystem as their final place (even in
a chart where the volume's mount point is the repository root), and out of Triton's sight: Triton
skips non-numeric folders inside a model, whereas every folder at the root is a model to it (and one
that fails to load stops a replica started with `--load-model=*`). A new model's folder therefore
exists from its first upload on; if that upload fails, the folder is removed again (release).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from services.shared.errors import FailedPrecondition

log = logging.getLogger(__name__)

STAGING = ".staging"  # inside each model folder
# Marks a model folder the registry created: it never writes into (or cleans) folders it does not own.
MARKER = ".maas-registry"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _prepared_for_registration(model_dir: Path) -> bool:
    """An empty folder, or one holding only what services read beside a model (tokenizer.json,
    preprocess.json, labels): how a shared volume (the chart's) gets them before the first version.
    A config.pbtxt or a version folder is a model someone else made."""
    return not any(c.name == "config.pbtxt" or (c.is_dir() and c.name.isdigit()) for c in model_dir.iterdir())


class ModelRepository:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def model_dir(self, model: str) -> Path:
        return self.root / model

    def version_dir(self, model: str, version: int) -> Path:
        return self.root / model / str(version)

    def staging_dir(self, model: str) -> Path:
        return self.root / model / STAGING

    def staged_uploads(self) -> list[Path]:
        """Every upload folder under staging (tests check nothing is left behind)."""
        return sorted(self.root.glob(f"*/{STAGING}/*"))

    def new_staging(self, model: str) -> Path:
        """A private folder for one upload of `model`, inside its (claimed) model folder."""
        staging = self.staging_dir(model)
        staging.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="upload-", dir=staging))

    def release(self, model: str) -> bool:
        """Remove the folder of a model that never got a version (its first upload failed), unless another
        upload is staging in it. True if removed."""
        model_dir = self.model_dir(model)
        staging = self.staging_dir(model)
        if not (model_dir / MARKER).exists() or (staging.is_dir() and any(staging.iterdir())):
            return False
        if any(c.name not in (MARKER, STAGING) for c in model_dir.iterdir()):
            return False  # it has versions or a config: a real model
        shutil.rmtree(model_dir, ignore_errors=True)
        _fsync_dir(self.root)
        return True

    def claim(self, model: str, registered: bool) -> None:
        """Make <root>/<model> ours; refuse a folder someone else put there (e.g. a hand-made model) unless
        the model is already `registered`."""
        model_dir = self.model_dir(model)
        if (model_dir / MARKER).exists():
            return
        if not registered and model_dir.exists() and not _prepared_for_registration(model_dir):
            raise FailedPrecondition(
                f"the model repository already has a folder {model!r} that the registry does not "
                f"manage; register under another name or move that folder away"
            )
        model_dir.mkdir(exist_ok=True)
        (model_dir / MARKER).write_text("managed by the MaaS Mesh registry\n")
        _fsync_dir(model_dir)
        _fsync_dir(self.root)

    def promote(self, staged_version: Path, model: str, version: int) -> Path:
        """Atomically move a staged, already fsynced (fsync_tree) version folder into place."""
        model_dir = self.model_dir(model)
        model_dir.mkdir(exist_ok=True)
        target = self.version_dir(model, version)
        if target.exists():  # left by a crash before the row was committed, and not cleaned yet
            shutil.rmtree(target)
        os.rename(staged_version, target)
        _fsync_dir(model_dir)
        _fsync_dir(self.root)
        return target

    def write_file(self, model: str, name: str, content: str) -> None:
        """Replace <model>/<name> atomically (temp file + fsync + rename)."""
        model_dir = self.model_dir(model)
        model_dir.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=model_dir)
        # mkstemp's 0600 would hide it from Triton, another user in the chart (uid 1000 vs 10001).
        os.fchmod(fd, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, model_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(model_dir)

    def remove_orphans(self, known: set[tuple[str, int]]) -> list[Path]:
        """Delete staging leftovers and version folders without a database row; returns what was removed."""
        removed = []
        known_models = {m for m, _ in known}
        for model_dir in self.root.iterdir():
            if not model_dir.is_dir():
                continue
            if model_dir.name not in known_models and not (model_dir / MARKER).exists():
                continue  # folders the registry did not create are not ours to touch
            for child in model_dir.iterdir():
                if child.name == STAGING and child.is_dir():
                    for entry in child.iterdir():
                        if entry.is_dir():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink(missing_ok=True)
                        removed.append(entry)
                elif child.is_dir() and child.name.isdigit() and (model_dir.name, int(child.name)) not in known:
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
                elif child.name.startswith(".") and child.name != MARKER and child.is_file():
                    # A temp file of an interrupted config write.
                    child.unlink(missing_ok=True)
                    removed.append(child)
            if model_dir.name not in known_models and self.release(model_dir.name):
                removed.append(model_dir)  # a first upload that never committed
        if removed:
            log.warning(
                "removed partial artefacts left by an interrupted registration",
                extra={"paths": [str(p) for p in removed]},
            )
        return removed
