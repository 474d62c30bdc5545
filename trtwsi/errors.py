"""Typed errors. Every message says what was wrong, the value seen, and how to fix it."""

from __future__ import annotations


class TrtwsiError(Exception):
    """Base class of every error trtwsi raises on purpose."""


# --- slides -------------------------------------------------------------------------------
class SlideError(TrtwsiError):
    """A slide could not be opened or read."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide path does not exist."""


class UnsupportedFormatError(SlideError):
    """No reader can open this file (not an image, or a format that needs an extra)."""


class CorruptSlideError(SlideError):
    """The file is an image of a known kind, but its structure is broken (truncated, absurd header)."""


class TileReadError(SlideError):
    """One file tile (or strip) of a slide could not be decoded.

    Attributes: ``level``, ``tile`` (file-tile index (row, col) or strip index), ``region`` (x, y, w, h
    in that level's pixels) and ``cause``.
    """

    def __init__(self, message: str, *, level: int = 0, tile=None, region=None, cause=None):
        super().__init__(message)
        self.level = level
        self.tile = tile
        self.region = region
        self.cause = cause


class RegionError(SlideError, ValueError):
    """A read_region request is invalid (negative size, level out of range, absurd size)."""


# --- tiling / sections --------------------------------------------------------------------
class TilingError(TrtwsiError, ValueError):
    """Tile size, overlap or target resolution cannot be satisfied."""


# --- models / engines ---------------------------------------------------------------------
class ModelError(TrtwsiError):
    """A model file is missing, corrupt, or not a YOLO detector."""


class BackendError(TrtwsiError):
    """No usable inference backend (and fallback was disabled or impossible)."""


class EngineMismatchError(BackendError):
    """A TensorRT engine was built for another GPU, TensorRT version, batch or image size."""


class MissingDependencyError(TrtwsiError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


# --- results ------------------------------------------------------------------------------
class OutputExistsError(TrtwsiError, FileExistsError):
    """Refusing to overwrite an existing output file (pass overwrite=True / --overwrite)."""


# --- batches ------------------------------------------------------------------------------
class BatchError(TrtwsiError):
    """A batch run cannot start or go on (bad --devices, output folder locked, no live worker)."""


class WorkerError(BatchError):
    """Batch worker processes (or Ray actors) could not be started or all died."""


def require(module: str, extra: str, purpose: str):
    """Import an optional module or raise MissingDependencyError naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{purpose} needs the Python module {module!r}, which is not importable ({e}). "
            f"Install it with: pip install 'trtwsi[{extra}]'"
        ) from e


class ExportError(TrtwsiError, ValueError):
    """Results cannot be written (or read back) as asked."""


class UnsupportedOutputFormatError(ExportError):
    """The output path's extension names no format trtwsi writes."""


class MergeError(TrtwsiError, ValueError):
    """Invalid input to the merge (shapes, non-finite values, inverted boxes, unknown option)."""


class ReaderStartError(TrtwsiError):
    """The slide reader processes could not start (the message says why and what to do)."""


# --- model files and model configs (issue 12) ---------------------------------------------
class ModelNotFoundError(ModelError, FileNotFoundError):
    """The weights file (or the models TOML file) does not exist."""


class UnsafeWeightsError(ModelError):
    """A ``.pt`` was refused: its pickle would call or build something outside the allow-list.

    Nothing from the file ran. Attributes: ``path`` (the file) and ``offending`` (tuple of the
    refused globals / operations, e.g. ``"posix.system"``). The message names the explicit opt-in
    for files the user trusts (``trust_weights=True``, ``trust_weights = true`` in models.toml,
    ``trtwsi predict --trust-weights``).
    """

    def __init__(self, message: str, *, path=None, offending=()):
        super().__init__(message)
        self.path = path
        self.offending = tuple(offending)


class ModelConfigError(ModelError, ValueError):
    """A model setting has the wrong type or is out of range (Model arguments, a models TOML
    file, or a value read from a checkpoint); the message names the source, the key, the value
    seen and what is allowed."""


class UsageError(TrtwsiError, ValueError):
    """An argument has a value that cannot work (the message names it and the valid values)."""


class EngineBuildError(TrtwsiError):
    """A TensorRT engine cannot be built as asked (``python -m trtwsi.export.build``): no
    builder for that GPU here, or the FP16 graph disagrees with the ``.pt``."""


class PackageBuildError(TrtwsiError, RuntimeError):
    """The child process building a compiled-model package failed, crashed, timed out or gave
    another output than the eager forward (:mod:`trtwsi.engines.compiled`); the engine falls
    back to ``torch.compile``."""


class NvrtcError(TrtwsiError, RuntimeError):
    """NVRTC rejected a kernel source (the message holds its log) or its child process
    failed (:mod:`trtwsi.ops.nvrtc`)."""


class DeviceError(TrtwsiError):
    """The device asked for is not there or cannot run this (no CUDA GPU, no CuPy, bad index)."""


class RuntimeStateError(TrtwsiError):
    """A Runtime or pool was used after ``close()``, or by two streams at once."""


# --- slide hardening ----------------------------------------------------------------------
class NotARegularFileError(UnsupportedFormatError):
    """The slide path is a directory, named pipe (FIFO), socket or device, not a regular file:
    reading it could block forever or never end. Give the path of the slide file itself."""


class IFDChainError(CorruptSlideError):
    """The TIFF's chain of image directories (IFDs) loops back on itself, is absurdly long, or
    holds so many size changes / tagless IFDs that parsing it would take minutes: the file is
    damaged (or hostile). Raised by :func:`trtwsi.slide.tiff_ifd.walk_ifd_chain`."""


class ImageTooLargeError(UnsupportedFormatError):
    """The image would have to be decoded whole into memory and is over the size limit
    (:data:`trtwsi.slide.array.MAX_ARRAY_PIXELS`): a JPEG/PNG/BMP whose header declares more, or a
    TIFF strip/tile that decodes to more. A subclass of UnsupportedFormatError: the layout, not
    the file, is the problem.

    The message gives the declared size and the limit, and how to convert the image into a tiled
    pyramidal TIFF that is read tile by tile."""


class TruncatedImageError(CorruptSlideError):
    """An ordinary image file (JPEG, PNG) ends before its end marker (JPEG EOI, PNG IEND): it was
    cut short (interrupted copy or download), and decoding it would return partly blank pixels."""


class InvalidDimensionsError(CorruptSlideError):
    """An image directory declares an empty (zero) width or height."""


# --- cli/batch robustness ---
class OutputFolderError(TrtwsiError, PermissionError):
    """An output folder cannot be written (read-only, no permission, a file in the way)."""


class OutputWriteError(ExportError):
    """Writing a finished run's outputs failed; ``rescue`` is where its detections were saved
    instead (None when even that failed)."""

    def __init__(self, message: str, *, rescue=None):
        super().__init__(message)
        self.rescue = rescue


class TooManyTileErrorsError(SlideError):
    """More tiles of a slide failed to decode than ``--max-tile-errors`` allows."""


class SlideTimeoutError(BatchError):
    """A slide of a batch ran longer than ``--slide-timeout``; its worker was stopped."""


class ManifestWriteError(BatchError, OSError):
    """A batch manifest record could not be written (full disk, read-only or lost folder); the
    manifest was truncated back to its last whole record."""
